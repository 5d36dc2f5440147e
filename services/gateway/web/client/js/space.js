// One Space: the scheduled view (start, remind, tickets), the live room (stage, hands,
// mic, reactions, captions, tips, speaking levels) and the ended view.
//
// Live state comes from WatchSpace (a WebSocket with resume): a snapshot, then events.
// The page never polls; it renders from `this.*` after each batch of events.

import { ApiError, api, call, eventually, formatMoney, idOf, session } from "./api.js";
import { MediaSession } from "./media.js";
import { openPay } from "./pay.js";
import { Stream } from "./stream.js";
import {
  $,
  EMOJI,
  EMOJI_NAMES,
  MODERATORS,
  ON_STAGE,
  ROLE_LABEL,
  busy,
  h,
  icon,
  initials,
  loadUsers,
  showError,
  toast,
  userHandle,
  userLabel,
  when,
} from "./ui.js";

const QUICK_EMOJI = [
  "EMOJI_PLUS_ONE",
  "EMOJI_HEART",
  "EMOJI_JOY",
  "EMOJI_CLAP",
  "EMOJI_FIRE",
  "EMOJI_HUNDRED",
];
const LEVEL_TTL_MS = 1200;
const END_REASONS = {
  SPACE_END_REASON_HOST_ENDED: "The host ended it.",
  SPACE_END_REASON_HOST_ABSENT: "The host was away too long.",
  SPACE_END_REASON_HOST_CANCELED: "The host canceled it.",
  SPACE_END_REASON_NOT_STARTED: "It never started.",
};

export class SpaceView {
  constructor(root) {
    this.root = root;
    this.media = new MediaSession($("#audio-sinks"));
    this.media.addEventListener("state", (e) => this._mediaState(e.detail));
    this._bindControls();
    this.reset();
    setInterval(() => this._decayLevels(), 300);
  }

  reset() {
    this.name = "";
    this.space = null;
    this.me = null;
    this.stage = new Map();
    this.hands = new Map();
    this.levels = new Map();
    this.tiles = new Map();
    this.captionsOn = false;
    this.captionLines = [];
    this.eventCounts = {};
    this.ended = false;
    this.generation = (this.generation || 0) + 1;
    if (this.stream) this.stream.close();
    this.stream = null;
  }

  // -- lifecycle -----------------------------------------------------------------------

  async open(id) {
    await this.close();
    this.reset();
    const generation = this.generation;
    this.name = `spaces/${id}`;
    this._show(null);
    $("#space-title").textContent = "…";
    $("#space-meta").textContent = "";
    $("#space-state").textContent = "";
    this._status("Loading…");
    let space;
    try {
      space = (await api.getSpace(this.name)).space;
    } catch (error) {
      this._status(
        error.status === 404
          ? "This Space does not exist or is hidden from you."
          : showError(error),
      );
      return;
    }
    if (generation !== this.generation) return;
    this.space = space;
    await loadUsers([space.host, ...(space.coHosts || [])]);
    this._renderHead();
    if (space.state === "SPACE_STATE_SCHEDULED") return this._showScheduled();
    if (space.state === "SPACE_STATE_LIVE") return this._join(generation);
    return this._showEnded();
  }

  /** Reopens the Space on screen if it is `name` and was shown as scheduled. */
  refreshIfStarted(name) {
    if (name === this.name && this.space && this.space.state === "SPACE_STATE_SCHEDULED") {
      this.open(idOf(this.name));
    }
  }

  /** Leaves media and the stream (navigating away); the participant stays until it leaves. */
  async close() {
    if (this.stream) this.stream.close();
    this.stream = null;
    await this.media.close();
  }

  async _join(generation) {
    this._status("Joining…");
    let reply;
    try {
      reply = await api.joinSpace(this.name);
    } catch (error) {
      if (error instanceof ApiError && error.reason === "TICKET_REQUIRED") {
        this._status(
          "This Space is ticketed and you have no ticket; ticket sales closed when it started.",
        );
        return;
      }
      this._status(showError(error));
      return;
    }
    if (generation !== this.generation) return;
    this.me = reply.participant;
    this._show("live");
    this._status("");
    this._watch();
    this._renderAll();
    this._connectMedia(reply.mediaGrant, generation);
  }

  async _connectMedia(grant, generation) {
    if (!window.RTCPeerConnection) {
      this._mediaLine("This browser has no WebRTC: you can follow the room but not hear it.");
      return;
    }
    this._mediaLine("Connecting audio…");
    try {
      const reply = await this.media.connect(grant);
      if (generation !== this.generation) return;
      $("#space-rec").hidden =
        !reply.recording && this.space.recordingState !== "RECORDING_STATE_ACTIVE";
      this._mediaState(this.media.state);
      if (this.media.sending) await this.media.setSending(true);
    } catch (error) {
      if (generation !== this.generation) return;
      this._mediaLine(`Audio unavailable: ${error.friendly || error.message}`);
    }
  }

  /** A failed connection: join again (same participant, fresh grant) and reconnect. */
  _rejoinMedia() {
    const now = Date.now();
    if (this.rejoinAt && now - this.rejoinAt < 10_000) return; // at most every 10 s
    this.rejoinAt = now;
    const generation = this.generation;
    setTimeout(async () => {
      if (generation !== this.generation || this.ended) return;
      try {
        const reply = await api.joinSpace(this.name);
        this._connectMedia(reply.mediaGrant, generation);
      } catch (error) {
        this._mediaLine(`Audio unavailable: ${error.friendly || error.message}`);
      }
    }, 1000);
  }

  _watch() {
    const stream = new Stream(
      `/v1/${this.name}:watch`,
      {
        onMessage: (message) => this._onEvents(message.events || []),
        onEnd: () => {
          if (!this.ended) this._refreshEnded();
        },
        onError: (status) => {
          this._status(status && status.message ? status.message : "Lost the live updates.");
        },
        onState: (state) => {
          if (state === "reconnecting") this._status("Reconnecting…");
          else if (state === "connected" && !this.ended) this._status("");
        },
      },
      { resumeParam: "resume_token" },
    );
    this.stream = stream;
    stream.open();
  }

  // -- events --------------------------------------------------------------------------

  async _onEvents(events) {
    const users = [];
    for (const event of events) {
      const kind = Object.keys(event).find(
        (k) => !["sequence", "resumeToken", "eventTime"].includes(k),
      );
      this.eventCounts[kind] = (this.eventCounts[kind] || 0) + 1;
      if (event.resumeToken && this.stream) this.stream.resumeToken = event.resumeToken;
      const names = this._apply(event);
      if (names) users.push(...names);
    }
    if (users.length) await loadUsers(users);
    this._renderAll();
  }

  /** Applies one event; returns user names the render needs. */
  _apply(event) {
    const isMe = (participant) => this.me && participant === this.me.name;
    if (event.snapshot) {
      const s = event.snapshot;
      this.space = s.space || this.space;
      this.stage = new Map((s.stage || []).map((p) => [p.name, p]));
      this.hands = new Map((s.raisedHands || []).map((p) => [p.name, p]));
      if (s.callerParticipant && s.callerParticipant.name) this.me = s.callerParticipant;
      if (this.me) this.captionsOn = Boolean(this.me.captionsEnabled);
      if (this.space.state !== "SPACE_STATE_LIVE") this._endedNow(this.space);
      return [...this.stage.values(), ...this.hands.values()].map((p) => p.user);
    }
    if (event.participantJoined) {
      const p = event.participantJoined.participant;
      if (ON_STAGE.has(p.role)) this.stage.set(p.name, p);
      if (isMe(p.name)) this.me = p;
      return [p.user];
    }
    if (event.participantLeft || event.participantRemoved) {
      const gone = (event.participantLeft || event.participantRemoved).participant;
      this.stage.delete(gone);
      this.hands.delete(gone);
      if (event.participantRemoved && isMe(gone)) {
        this.ended = true;
        this.media.close();
        this._status("A moderator removed you from this Space.");
        this._show(null);
      }
      return null;
    }
    if (event.roleChanged) {
      const { participant: p, newRole } = event.roleChanged;
      if (ON_STAGE.has(newRole)) this.stage.set(p.name, p);
      else this.stage.delete(p.name);
      this.hands.delete(p.name);
      if (isMe(p.name)) {
        const wasOnStage = ON_STAGE.has(this.me.role);
        this.me = p;
        if (ON_STAGE.has(newRole) && !wasOnStage) {
          toast("You're a speaker now. Unmute when you're ready to talk.");
        } else if (!ON_STAGE.has(newRole) && wasOnStage) {
          this.media.releaseMicrophone();
          toast("You're a listener again.");
        }
      }
      return [p.user];
    }
    if (event.handRaised) {
      const p = event.handRaised.participant;
      this.hands.set(p.name, p);
      if (isMe(p.name)) this.me = { ...this.me, handRaised: true };
      else if (this._moderator()) toast(`${userLabel(p.user)} raised a hand`);
      return [p.user];
    }
    if (event.handLowered) {
      const { participant, reason } = event.handLowered;
      this.hands.delete(participant);
      if (isMe(participant)) {
        this.me = { ...this.me, handRaised: false };
        if (reason === "HAND_LOWERED_REASON_DENIED") toast("Your request to speak was declined.");
      }
      return null;
    }
    if (event.muteChanged) {
      const { participant, muted } = event.muteChanged;
      const p = this.stage.get(participant);
      if (p) this.stage.set(participant, { ...p, muted });
      if (isMe(participant)) {
        this.me = { ...this.me, muted };
        if (muted && this.media.sending) {
          this.media.setSending(false);
          if (event.muteChanged.changedBy && event.muteChanged.changedBy !== session.user?.name) {
            toast("A moderator muted you.");
          }
        }
      }
      return null;
    }
    if (event.invitationChanged) {
      const { participant, invitation, state } = event.invitationChanged;
      if (isMe(participant)) this._invitation(invitation, state);
      return null;
    }
    if (event.reactions) {
      this._showReactions(event.reactions.counts || []);
      return null;
    }
    if (event.speakingLevels) {
      const now = performance.now();
      for (const l of event.speakingLevels.levels || []) {
        this.levels.set(l.participant, { level: l.level || 0, speaking: l.speaking, at: now });
      }
      this._renderLevels();
      return null;
    }
    if (event.captionSegment) {
      this._caption(event.captionSegment);
      return null;
    }
    if (event.captionsSettingChanged) {
      if (isMe(event.captionsSettingChanged.participant)) {
        this.captionsOn = Boolean(event.captionsSettingChanged.enabled);
      }
      return null;
    }
    if (event.pinnedMessageChanged) {
      this.space = { ...this.space, pinnedMessage: event.pinnedMessageChanged.pinnedMessage };
      return null;
    }
    if (event.spaceUpdated) {
      this.space = event.spaceUpdated.space;
      return null;
    }
    if (event.spaceEnded) {
      this._endedNow(event.spaceEnded.space);
      return null;
    }
    if (event.mediaReconnect) {
      this._connectMedia(event.mediaReconnect.mediaGrant, this.generation);
      return null;
    }
    if (event.recordingStateChanged) {
      this.space = { ...this.space, recordingState: event.recordingStateChanged.state };
      return null;
    }
    if (event.participantCountsChanged) {
      this.space = { ...this.space, participantCounts: event.participantCountsChanged.counts };
      return null;
    }
    return null;
  }

  _endedNow(space) {
    if (this.ended) return;
    this.ended = true;
    this.space = space || this.space;
    this.media.close();
    if (this.stream) this.stream.close();
    this._showEnded();
  }

  async _refreshEnded() {
    try {
      const space = (await api.getSpace(this.name)).space;
      if (space.state !== "SPACE_STATE_LIVE") this._endedNow(space);
    } catch {
      // keep what we show
    }
  }

  // -- rendering -----------------------------------------------------------------------

  _show(which) {
    $("#space-scheduled").hidden = which !== "scheduled";
    $("#space-live").hidden = which !== "live";
    $("#space-ended").hidden = which !== "ended";
    const live = which === "live";
    $("#leave-btn").hidden = !live;
    $("#end-btn").hidden = !(live && this._isHost());
  }

  _status(text) {
    $("#space-status").textContent = text || "";
  }

  _mediaLine(text) {
    $("#media-state").textContent = text;
  }

  _isHost() {
    return Boolean(this.space && session.user && this.space.host === session.user.name);
  }

  _moderator() {
    return Boolean(this.me && MODERATORS.has(this.me.role));
  }

  _renderHead() {
    const s = this.space;
    $("#space-title").textContent = s.title;
    document.title = `${s.title} · Spaces`;
    const states = {
      SPACE_STATE_LIVE: "Live",
      SPACE_STATE_SCHEDULED: "Scheduled",
      SPACE_STATE_ENDED: "Ended",
      SPACE_STATE_CANCELED: "Canceled",
    };
    $("#space-state").textContent = states[s.state] || "";
    $("#space-state").dataset.state = s.state || "";
    const bits = [`Hosted by ${userLabel(s.host)} ${userHandle(s.host)}`];
    if ((s.topics || []).length) bits.push(s.topics.join(" · "));
    if (s.ticketed) bits.push("Ticketed");
    $("#space-meta").textContent = bits.join(" — ");
    $("#space-rec").hidden = s.recordingState !== "RECORDING_STATE_ACTIVE";
    const pin = s.pinnedMessage;
    const pinned = $("#space-pinned");
    pinned.hidden = !(pin && (pin.text || pin.uri));
    if (!pinned.hidden) {
      pinned.replaceChildren(
        "📌 ",
        pin.text || "",
        pin.uri && /^https?:\/\//.test(pin.uri)
          ? h("a", { href: pin.uri, rel: "noopener noreferrer", target: "_blank" }, ` ${pin.uri}`)
          : "",
      );
    }
  }

  _renderAll() {
    if (!this.space) return;
    this._renderHead();
    if (this.ended || !this.me) return;
    this._show("live");
    this._renderStage();
    this._renderHands();
    this._renderControls();
    const c = this.space.participantCounts || {};
    const listeners = Number(c.listenerCount || 0);
    $("#listener-count").textContent = `${listeners} ${listeners === 1 ? "listener" : "listeners"}`;
  }

  _renderStage() {
    const list = $("#stage");
    const order = {
      PARTICIPANT_ROLE_HOST: 0,
      PARTICIPANT_ROLE_CO_HOST: 1,
      PARTICIPANT_ROLE_SPEAKER: 2,
    };
    const people = [...this.stage.values()].sort(
      (a, b) =>
        order[a.role] - order[b.role] || String(a.joinTime).localeCompare(String(b.joinTime)),
    );
    const keep = new Set(people.map((p) => p.name));
    for (const [name, tile] of this.tiles) {
      if (!keep.has(name)) {
        tile.remove();
        this.tiles.delete(name);
      }
    }
    for (const p of people) {
      const tile = this._tile(p);
      list.append(tile); // re-appending keeps the order
    }
    this._renderLevels();
  }

  _tile(p) {
    const mine = this.me && p.name === this.me.name;
    const label = userLabel(p.user);
    const tile = h(
      "li",
      { class: "tile", dataset: { participant: p.name, user: p.user } },
      h("div", { class: "avatar", "aria-hidden": "true" }, initials(label)),
      h("span", { class: "name" }, label),
      h("span", { class: "role" }, ROLE_LABEL[p.role] || ""),
      h("span", { class: "talking", hidden: true }, "Speaking"),
      h("span", { class: "muted-icon" }, p.muted ? icon("micOff") : "", p.muted ? " muted" : ""),
      mine ? h("span", { class: "you" }, "You") : "",
    );
    tile.setAttribute(
      "aria-label",
      `${label}, ${ROLE_LABEL[p.role] || ""}${p.muted ? ", muted" : ""}${mine ? ", you" : ""}`,
    );
    if (this._moderator() && !mine && p.role === "PARTICIPANT_ROLE_SPEAKER") {
      tile.append(
        h(
          "div",
          { class: "mod" },
          p.muted ? "" : h("button", { type: "button", onclick: () => this._mute(p) }, "Mute"),
          h("button", { type: "button", onclick: () => this._revoke(p) }, "Move to listeners"),
        ),
      );
    }
    const old = this.tiles.get(p.name);
    if (old) old.replaceWith(tile);
    this.tiles.set(p.name, tile);
    return tile;
  }

  _renderLevels() {
    // The ring follows the level media reports (any sound at all); "speaking" is media's
    // own call (its smoothed level above its threshold) and also shows as text.
    const now = performance.now();
    for (const [name, tile] of this.tiles) {
      const l = this.levels.get(name);
      const fresh = Boolean(l && now - l.at < LEVEL_TTL_MS);
      const level = fresh ? l.level : 0;
      tile.classList.toggle("active", level > 0.05);
      tile.classList.toggle("speaking", fresh && Boolean(l.speaking));
      tile.dataset.level = level.toFixed(2);
      tile.querySelector(".avatar").style.setProperty("--level", level.toFixed(3));
      tile.querySelector(".talking").hidden = !(fresh && l.speaking);
    }
  }

  _decayLevels() {
    if (this.tiles.size && this.levels.size) this._renderLevels();
  }

  _renderHands() {
    const panel = $("#hands-panel");
    panel.hidden = !this._moderator();
    if (panel.hidden) return;
    const hands = [...this.hands.values()].sort((a, b) =>
      String(a.handRaiseTime).localeCompare(String(b.handRaiseTime)),
    );
    $("#hands-empty").hidden = hands.length > 0;
    $("#hands-list").replaceChildren(
      ...hands.map((p) =>
        h(
          "li",
          { dataset: { participant: p.name } },
          h(
            "span",
            {},
            icon("hand"),
            ` ${userLabel(p.user)} `,
            h("span", { class: "sub" }, userHandle(p.user)),
          ),
          h(
            "span",
            { class: "actions" },
            h(
              "button",
              {
                type: "button",
                class: "primary",
                "aria-label": `Approve ${userLabel(p.user)} to speak`,
                onclick: (e) => busy(e.currentTarget, () => api.approveSpeaker(p.name)),
              },
              "Approve",
            ),
            h(
              "button",
              {
                type: "button",
                "aria-label": `Deny ${userLabel(p.user)}`,
                onclick: (e) => busy(e.currentTarget, () => api.denySpeaker(p.name)),
              },
              "Deny",
            ),
          ),
        ),
      ),
    );
  }

  _renderControls() {
    const me = this.me;
    const onStage = ON_STAGE.has(me.role);
    const mic = $("#mic-btn");
    mic.hidden = !onStage;
    const live = onStage && !me.muted;
    mic.setAttribute("aria-pressed", String(live));
    mic.replaceChildren(icon(live ? "mic" : "micOff"), live ? "Mute" : "Unmute");
    mic.setAttribute("aria-label", live ? "Mute your microphone" : "Unmute your microphone");
    const hand = $("#hand-btn");
    hand.hidden = onStage;
    hand.setAttribute("aria-pressed", String(Boolean(me.handRaised)));
    hand.replaceChildren(icon("hand"), me.handRaised ? "Lower hand" : "Raise hand");
    const cap = $("#captions-btn");
    cap.disabled = !this.space.captionsAvailable;
    cap.title = this.space.captionsAvailable ? "" : "Captions are not available in this Space";
    cap.setAttribute("aria-pressed", String(this.captionsOn));
    cap.textContent = this.captionsOn ? "CC on" : "CC off";
    cap.setAttribute("aria-label", this.captionsOn ? "Turn captions off" : "Turn captions on");
    $("#captions").hidden = !this.captionsOn;
    const others = [...this.stage.values()].filter((p) => p.name !== me.name);
    $("#tip-btn").disabled = others.length === 0;
  }

  _showScheduled() {
    this._show("scheduled");
    this._status("");
    const s = this.space;
    $("#scheduled-when").textContent = `Starts ${when(s.scheduledStartTime)}`;
    const host = this._isHost();
    $("#start-now").hidden = !host;
    $("#cancel-space").hidden = !host;
    $("#remind-btn").hidden = host || s.reminderSet;
    $("#buy-ticket").hidden = true;
    $("#ticket-info").hidden = true;
    if (s.ticketed) this._loadOffering();
  }

  async _loadOffering() {
    try {
      const offering = (await api.getTicketOffering(this.name)).ticketOffering;
      this.offering = offering;
      const left = Number(offering.capacity || 0) - Number(offering.soldCount || 0);
      const info = $("#ticket-info");
      info.hidden = false;
      info.textContent = `Tickets: ${formatMoney(offering.price)} — ${left} left`;
      const onSale = offering.state === "STATE_ON_SALE" || offering.state === undefined;
      $("#buy-ticket").hidden = this._isHost() || !onSale || left <= 0;
      $("#buy-ticket").textContent = `Buy ticket · ${formatMoney(offering.price)}`;
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) showError(error);
    }
  }

  _showEnded() {
    this._renderHead();
    this._show("ended");
    this._status("");
    const s = this.space;
    const parts = [];
    if (s.state === "SPACE_STATE_CANCELED")
      $("#ended-title").textContent = "This Space was canceled";
    else $("#ended-title").textContent = "This Space has ended";
    if (END_REASONS[s.endReason]) parts.push(END_REASONS[s.endReason]);
    if (s.startTime && s.endTime) {
      const minutes = Math.max(
        1,
        Math.round((Date.parse(s.endTime) - Date.parse(s.startTime)) / 60000),
      );
      parts.push(`It lasted ${minutes} minute${minutes === 1 ? "" : "s"}.`);
    }
    $("#ended-detail").textContent = parts.join(" ");
    $("#space-ended").focus();
    this._showReplay(this.generation);
  }

  /** A recorded Space: wait for its recording to be ready, then offer to play it. */
  async _showReplay(generation) {
    const box = $("#replay");
    const status = $("#replay-status");
    const button = $("#replay-btn");
    const audio = $("#replay-audio");
    // The ended view can be drawn again (a late event, a refresh) while the recording is
    // already offered or playing: keep the player as it is.
    if (this._replayOffered === this.name) return;
    button.hidden = true;
    audio.hidden = true;
    if (audio.src) URL.revokeObjectURL(audio.src);
    audio.removeAttribute("src");
    box.hidden = !(this.space && this.space.recording);
    if (box.hidden) return;
    status.textContent = "Preparing the recording…";
    for (let attempt = 0; attempt < 20 && generation === this.generation; attempt += 1) {
      let recordings;
      try {
        recordings = (await api.listRecordings(this.name)).recordings || [];
      } catch (error) {
        status.textContent = `No recording: ${error.friendly || error.message}`;
        return;
      }
      const ready = recordings.find((r) => r.state === "STATE_READY");
      if (ready) {
        this._replayOffered = this.name;
        const seconds = Math.round(parseFloat(ready.duration || "0"));
        const length = `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
        status.textContent = `Recording ready (${length}).`;
        button.hidden = false;
        button.onclick = () =>
          busy(button, async () => {
            const blob = await api.readRecording(ready.name);
            audio.src = URL.createObjectURL(blob);
            audio.hidden = false;
            button.hidden = true;
            await audio.play().catch(() => {});
          });
        return;
      }
      if (recordings.length && recordings.every((r) => r.state === "STATE_FAILED")) {
        status.textContent = "The recording failed.";
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, Math.min(1000 * 2 ** attempt, 5000)));
    }
    if (generation === this.generation) status.textContent = "The recording is not ready yet.";
  }

  // -- actions -------------------------------------------------------------------------

  _bindControls() {
    $("#mic-btn").addEventListener("click", (e) => busy(e.currentTarget, () => this._toggleMic()));
    $("#hand-btn").addEventListener("click", (e) =>
      busy(e.currentTarget, async () => {
        // Decided before the call: the hand_raised event may arrive before the answer.
        const raise = !this.me.handRaised;
        if (raise) await api.requestToSpeak(this.name);
        else await api.cancelSpeakRequest(this.name);
        this.me = { ...this.me, handRaised: raise };
        this._renderControls();
      }),
    );
    $("#captions-btn").addEventListener("click", (e) =>
      busy(e.currentTarget, async () => {
        const on = !this.captionsOn;
        await api.setCaptions(this.name, on);
        this.captionsOn = on;
        if (!on) this.captionLines = [];
        this._renderCaptions();
        this._renderControls();
      }),
    );
    $("#tip-btn").addEventListener("click", () => this._tip());
    $("#leave-btn").addEventListener("click", (e) =>
      busy(e.currentTarget, async () => {
        await this.close();
        await api.leaveSpace(this.name).catch(() => {});
        location.hash = "#/";
      }),
    );
    $("#end-btn").addEventListener("click", (e) => {
      if (!window.confirm("End this Space for everyone?")) return;
      busy(e.currentTarget, async () => {
        const reply = await api.endSpace(this.name);
        this._endedNow(reply.space);
      });
    });
    $("#start-now").addEventListener("click", (e) =>
      busy(e.currentTarget, async () => {
        await api.startSpace(this.name);
        await this.open(idOf(this.name));
      }),
    );
    $("#cancel-space").addEventListener("click", (e) => {
      if (!window.confirm("Cancel this Space? Ticket holders are refunded.")) return;
      busy(e.currentTarget, async () => {
        const reply = await api.cancelSpace(this.name);
        this.space = reply.space || { ...this.space, state: "SPACE_STATE_CANCELED" };
        this._showEnded();
      });
    });
    $("#remind-btn").addEventListener("click", (e) =>
      busy(e.currentTarget, async () => {
        await api.createReminder(this.name);
        e.currentTarget.hidden = true;
        toast("We'll remind you when it starts.");
      }),
    );
    $("#buy-ticket").addEventListener("click", () => this._buyTicket());
    $("#emoji-bar").replaceChildren(
      ...QUICK_EMOJI.map((emoji) =>
        h(
          "button",
          {
            type: "button",
            "aria-label": `React with ${EMOJI_NAMES[emoji]}`,
            onclick: (e) => busy(e.currentTarget, () => api.sendReaction(this.name, emoji)),
          },
          EMOJI[emoji],
        ),
      ),
    );
  }

  async _toggleMic() {
    if (this.me.muted) {
      // Open the microphone first: a refused permission must not announce "unmuted".
      await this.media.setSending(true);
      try {
        await api.setOwnMute(this.name, false);
      } catch (error) {
        await this.media.setSending(false);
        throw error;
      }
      this.me = { ...this.me, muted: false };
    } else {
      await this.media.setSending(false);
      await api.setOwnMute(this.name, true);
      this.me = { ...this.me, muted: true };
    }
    const p = this.stage.get(this.me.name);
    if (p) this.stage.set(p.name, { ...p, muted: this.me.muted });
    this._renderAll();
  }

  async _mute(p) {
    try {
      await api.muteParticipant(p.name);
    } catch (error) {
      showError(error);
    }
  }

  async _revoke(p) {
    try {
      await api.revokeSpeaker(p.name);
    } catch (error) {
      showError(error);
    }
  }

  _invitation(invitation, state) {
    if (state !== "INVITATION_STATE_PENDING" || !invitation) return;
    const kind = invitation.kind === "INVITATION_KIND_CO_HOST" ? "co-host" : "speak";
    const accept = kind === "co-host" ? "acceptCoHostInvitation" : "acceptSpeakInvitation";
    const decline = kind === "co-host" ? "declineCoHostInvitation" : "declineSpeakInvitation";
    const box = h(
      "div",
      { class: "toast actionable", role: "alertdialog", "aria-label": `Invitation to ${kind}` },
      `${userLabel(invitation.inviter)} invited you to ${kind}. `,
      h(
        "button",
        {
          type: "button",
          onclick: () => {
            box.remove();
            fetchAction(accept, this.name);
          },
        },
        "Accept",
      ),
      " ",
      h(
        "button",
        {
          type: "button",
          onclick: () => {
            box.remove();
            fetchAction(decline, this.name);
          },
        },
        "Decline",
      ),
    );
    $("#toasts").append(box);
  }

  _showReactions(counts) {
    const float = $("#reactions-float");
    const spoken = [];
    for (const c of counts) {
      if (!EMOJI[c.emoji] || !c.count) continue;
      const span = h("span", {}, EMOJI[c.emoji], c.count > 1 ? h("b", {}, `×${c.count}`) : "");
      float.append(span);
      setTimeout(() => span.remove(), 2600);
      spoken.push(`${c.count} ${EMOJI_NAMES[c.emoji]}`);
    }
    if (spoken.length) $("#reactions-live").textContent = `Reactions: ${spoken.join(", ")}`;
  }

  _caption(segment) {
    if (!this.captionsOn) return;
    const existing = this.captionLines.find((l) => l.id === segment.segmentId);
    if (existing) Object.assign(existing, { text: segment.text, final: segment.final });
    else
      this.captionLines.push({
        id: segment.segmentId,
        speaker: segment.speaker,
        text: segment.text,
        final: segment.final,
      });
    this.captionLines = this.captionLines.slice(-3);
    this._renderCaptions();
  }

  _renderCaptions() {
    const box = $("#captions-text");
    box.replaceChildren(
      ...this.captionLines.map((l) => {
        const p = this.stage.get(l.speaker);
        const who = p ? `${userLabel(p.user)}: ` : "";
        return h("span", { class: l.final ? "" : "partial" }, who, l.text, h("br"));
      }),
    );
  }

  _tip() {
    const recipients = [...this.stage.values()]
      .filter((p) => p.name !== this.me.name)
      .map((p) => ({ name: p.user, label: `${userLabel(p.user)} (${ROLE_LABEL[p.role]})` }));
    openPay({
      title: "Send a tip",
      summary: "Tips go to someone on stage. 1.00 to 500.00 USD.",
      recipients,
      submit: async (v) => {
        // A speaker approved a moment ago may not be on payments' stage yet.
        const reply = await eventually(
          () => api.sendTip(this.name, v.recipient, v.amount, v.card, v.message),
          ["RECIPIENT_NOT_ON_STAGE", "SPACE_NOT_LIVE", "SPACE_NOT_FOUND"],
          6000,
        );
        toast(
          `Tip of ${formatMoney(reply.tip.amount)} sent to ${userLabel(v.recipient)}. Thank you!`,
        );
      },
    });
  }

  async _buyTicket() {
    const offering = this.offering;
    if (!offering) return;
    const paid = await openPay({
      title: "Buy a ticket",
      summary: `${this.space.title} — ${formatMoney(offering.price)}`,
      recipients: null,
      submit: (v) => api.purchaseTicket(this.name, offering.price, v.card),
    });
    if (paid) {
      toast("Ticket bought. You're in!");
      $("#buy-ticket").hidden = true;
      $("#ticket-info").textContent = `You have a ticket (${formatMoney(offering.price)}).`;
    }
  }

  _mediaState(state) {
    if (!this.me || this.ended) return;
    if (state === "failed") this._rejoinMedia();
    const labels = {
      new: "Connecting audio…",
      connecting: "Connecting audio…",
      connected: "Audio connected",
      disconnected: "Audio interrupted, reconnecting…",
      failed: "Audio connection failed",
      closed: "",
    };
    this._mediaLine(labels[state] ?? `Audio: ${state}`);
  }
}

function fetchAction(verb, name) {
  return call("POST", `/v1/${name}:${verb}`, {}).catch((error) => showError(error));
}
