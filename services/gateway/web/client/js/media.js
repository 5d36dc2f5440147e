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
// When the network changes under us (Wi-Fi to cellular, a NAT rebinding), ICE goes
// 'disconnected' or 'failed': after RESTART_AFTER_MS of that we restart ICE on the same
// session (pc.restartIce(), a new offer to RestartIce, its answer), which keeps the DTLS
// session, the slots and our place in the Space. Only if that fails is 'failed' reported,
// and the Space page rejoins for a fresh grant.

import { api } from "./api.js";

export const SLOTS = 3;
const GATHER_TIMEOUT_MS = 4000;
// 'disconnected' this long means the path is gone, not a burst of loss: restart ICE.
const RESTART_AFTER_MS = 3000;
// Restarts in a row that did not reconnect before we give up and rejoin instead.
const RESTART_ATTEMPTS = 2;

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
    this.closed = false;
    this.restarting = false;
    this.restarts = 0;
    this.restartAttempts = 0;
    this.onRestartFailed = null;
    this._restartTimer = null;
    this.pc.addEventListener("iceconnectionstatechange", () => this._iceState());
  }

  _useIceServers(iceServers) {
    if (!iceServers || !iceServers.length) return;
    try {
      this.pc.setConfiguration({ ...this.pc.getConfiguration(), iceServers });
    } catch {
      // a configuration the browser refuses is not worth failing the call for
    }
  }

  _iceState() {
    const state = this.pc.iceConnectionState;
    if (state === "connected" || state === "completed") this.restartAttempts = 0;
    if (state === "disconnected") {
      // Often back by itself within a second or two (consent checks answered again).
      if (!this._restartTimer) {
        this._restartTimer = setTimeout(() => {
          this._restartTimer = null;
          if (this.pc.iceConnectionState === "disconnected") this.restartIce();
        }, RESTART_AFTER_MS);
      }
      return;
    }
    clearTimeout(this._restartTimer);
    this._restartTimer = null;
    if (state === "failed") this.restartIce();
  }

  /** Restarts ICE on the same media session (new credentials, same DTLS and slots). */
  async restartIce() {
    if (this.restarting || this.closed || !this.session) return;
    if (this.restartAttempts >= RESTART_ATTEMPTS) {
      if (this.onRestartFailed) this.onRestartFailed(new Error("ICE restarts did not reconnect"));
      return;
    }
    this.restarting = true;
    this.restartAttempts += 1;
    try {
      this.pc.restartIce();
      await this.pc.setLocalDescription(await this.pc.createOffer({ iceRestart: true }));
      await waitForGathering(this.pc);
      const reply = await api.restartIce(this.session, this.pc.localDescription.sdp);
      if (this.closed) return;
      this._useIceServers(reply.iceServers);
      await this.pc.setRemoteDescription({ type: "answer", sdp: reply.sdpAnswer });
      this.restarts += 1;
    } catch (error) {
      // The session is gone (NOT_FOUND) or the node refused: back to a stable state, and
      // let the Space page rejoin for a fresh grant.
      if (this.pc.signalingState === "have-local-offer") {
        await this.pc.setLocalDescription({ type: "rollback" }).catch(() => {});
      }
      if (!this.closed && this.onRestartFailed) this.onRestartFailed(error);
      return;
    } finally {
      this.restarting = false;
    }
    // Still failed after the restart (e.g. the answer raced the new path): try once more.
    if (this.pc.iceConnectionState === "failed") this.restartIce();
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
    this._useIceServers(reply.iceServers);
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
    this.closed = true;
    clearTimeout(this._restartTimer);
    this._restartTimer = null;
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
        if (this.conn !== next) return;
        const state = next.pc.connectionState;
        // A failure while ICE restarts may still heal; the restart's outcome decides.
        if (state === "failed" && next.restarting) return;
        this._emit("state", state);
      });
      next.onRestartFailed = () => {
        if (this.conn === next) this._emit("state", "failed");
      };
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
      iceRestarts: this.conn ? this.conn.restarts : 0,
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
