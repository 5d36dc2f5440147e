// WebRTC with the media service (the SFU).
//
// One RTCPeerConnection per Space: the first audio transceiver (sendrecv) is the one we
// publish on, the next SLOTS recvonly ones are the listening slots media forwards the
// loudest speakers into. The microphone is attached with sender.replaceTrack only while
// on stage and unmuted, so coming on stage needs no renegotiation; muting detaches it
// (no packets at all, not packets of silence). Opus only. Media answers with all its
// candidates, so we gather ours completely before sending the offer (no trickle).
// A media_reconnect event brings a fresh grant: a new session is connected before the
// old one is left (media closes the older of two sessions of the same participant).

import { api } from "./api.js";

export const SLOTS = 3;
const GATHER_TIMEOUT_MS = 4000;

function waitForGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      pc.removeEventListener("icegatheringstatechange", check);
      clearTimeout(timer);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    // With no reachable STUN server gathering can linger; what we have by then is enough.
    const timer = setTimeout(done, GATHER_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

function preferOpus(transceiver) {
  if (!transceiver.setCodecPreferences || !window.RTCRtpReceiver?.getCapabilities) return;
  const caps = RTCRtpReceiver.getCapabilities("audio");
  const opus = caps ? caps.codecs.filter((c) => c.mimeType.toLowerCase() === "audio/opus") : [];
  if (opus.length) transceiver.setCodecPreferences(opus);
}

function nodeName(node) {
  return node.startsWith("mediaNodes/") ? node : `mediaNodes/${node}`;
}

class Connection {
  constructor(sinks) {
    this.pc = new RTCPeerConnection({ bundlePolicy: "max-bundle" });
    this.publish = this.pc.addTransceiver("audio", { direction: "sendrecv" });
    preferOpus(this.publish);
    this.slots = [];
    for (let i = 0; i < SLOTS; i += 1) {
      const t = this.pc.addTransceiver("audio", { direction: "recvonly" });
      preferOpus(t);
      this.slots.push(t);
    }
    this.sinks = sinks;
    this.audios = [];
    this.session = "";
    this.slotCount = 0;
  }

  async negotiate(grant) {
    const offer = await this.pc.createOffer();
    await this.pc.setLocalDescription(offer);
    await waitForGathering(this.pc);
    const reply = await api.negotiate(
      nodeName(grant.endpoint.node),
      grant.token,
      this.pc.localDescription.sdp,
    );
    this.session = reply.session;
    this.slotCount = Math.min(reply.slotCount || SLOTS, SLOTS);
    if (reply.iceServers && reply.iceServers.length) {
      try {
        this.pc.setConfiguration({ ...this.pc.getConfiguration(), iceServers: reply.iceServers });
      } catch {
        // a configuration the browser refuses is not worth failing the call for
      }
    }
    await this.pc.setRemoteDescription({ type: "answer", sdp: reply.sdpAnswer });
    this._play();
    return reply;
  }

  _play() {
    // One <audio> per slot media uses; the slots' tracks exist from the start.
    this.slots.slice(0, this.slotCount).forEach((t, i) => {
      const audio = document.createElement("audio");
      audio.autoplay = true;
      audio.dataset.slot = String(i);
      audio.srcObject = new MediaStream([t.receiver.track]);
      this.sinks.append(audio);
      audio.play().catch(() => {}); // autoplay rules: the join click normally allows it
      this.audios.push(audio);
    });
  }

  async close() {
    for (const audio of this.audios) {
      audio.srcObject = null;
      audio.remove();
    }
    this.audios = [];
    this.pc.close();
    if (this.session) {
      const session = this.session;
      this.session = "";
      await api.leaveSession(session).catch(() => {});
    }
  }
}

export class MediaSession extends EventTarget {
  /** @param {HTMLElement} sinks where the slots' <audio> elements go */
  constructor(sinks) {
    super();
    this.sinks = sinks;
    this.conn = null;
    this.mic = null;
    this.sending = false;
    this.recording = false;
    this.mayPublish = false;
    this._queue = Promise.resolve();
  }

  get state() {
    return this.conn ? this.conn.pc.connectionState : "closed";
  }

  /** Connects (or reconnects, with a fresh grant) and keeps the microphone state. */
  connect(grant) {
    return this._serial(async () => {
      const next = new Connection(this.sinks);
      next.pc.addEventListener("connectionstatechange", () => {
        if (this.conn === next) this._emit("state", next.pc.connectionState);
      });
      let reply;
      try {
        reply = await next.negotiate(grant);
      } catch (error) {
        await next.close();
        throw error;
      }
      const previous = this.conn;
      this.conn = next;
      this.recording = Boolean(reply.recording);
      this.mayPublish = Boolean(reply.mayPublish);
      if (this.sending && this.mic) await next.publish.sender.replaceTrack(this.mic);
      if (previous) await previous.close();
      this._emit("state", next.pc.connectionState);
      return reply;
    });
  }

  /** Starts or stops sending the microphone (getUserMedia on first use). */
  setSending(on) {
    return this._serial(async () => {
      if (on && !this.mic) {
        const stream = await navigator.mediaDevices.getUserMedia({
          audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
          video: false,
        });
        this.mic = stream.getAudioTracks()[0];
      }
      this.sending = on;
      if (this.conn) await this.conn.publish.sender.replaceTrack(on ? this.mic : null);
    });
  }

  /** Releases the microphone (left the stage). */
  releaseMicrophone() {
    return this._serial(async () => {
      this.sending = false;
      if (this.conn) await this.conn.publish.sender.replaceTrack(null);
      if (this.mic) this.mic.stop();
      this.mic = null;
    });
  }

  /** Inbound/outbound audio numbers from getStats (for the tests and the status line). */
  async audioStats() {
    const result = {
      inbound: [],
      outbound: null,
      state: this.state,
      session: this.conn ? this.conn.session : "",
      slotCount: this.conn ? this.conn.slotCount : 0,
    };
    if (!this.conn) return result;
    const report = await this.conn.pc.getStats();
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "audio") {
        result.inbound.push({
          mid: s.mid,
          packetsReceived: s.packetsReceived || 0,
          bytesReceived: s.bytesReceived || 0,
          totalAudioEnergy: s.totalAudioEnergy || 0,
          audioLevel: s.audioLevel || 0,
          totalSamplesDuration: s.totalSamplesDuration || 0,
        });
      }
      if (s.type === "outbound-rtp" && s.kind === "audio" && s.mid === this.conn.publish.mid) {
        result.outbound = { packetsSent: s.packetsSent || 0, bytesSent: s.bytesSent || 0 };
      }
    });
    return result;
  }

  close() {
    return this._serial(async () => {
      const conn = this.conn;
      this.conn = null;
      if (this.mic) this.mic.stop();
      this.mic = null;
      this.sending = false;
      if (conn) await conn.close();
      this._emit("state", "closed");
    });
  }

  _serial(fn) {
    const run = this._queue.then(fn, fn);
    this._queue = run.catch(() => {});
    return run;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
