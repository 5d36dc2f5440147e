// Server streams over the gateway's WebSockets, reconnecting with backoff.
//
// The token travels as the subprotocol pair ("bearer", token), so it never appears in a
// URL or a log. Each text frame is one response message; a failing stream sends a last
// {"error": Status} frame and closes with 4000 + its HTTP status; 1000 is a normal end.
// Resuming is the RPC's business: `resumeParam` names the query parameter that carries
// the last resume token (WatchSpace), and the stream reconnects after it.

import { session } from "./api.js";

const MAX_BACKOFF_MS = 10_000;

export class Stream {
  /**
   * @param {string} path e.g. "/v1/spaces/abc:watch"
   * @param {object} handlers onMessage(message), onEnd(), onError(status, code), onState(text)
   * @param {object} options resumeParam: query parameter of the resume token
   */
  constructor(path, handlers, options = {}) {
    this.path = path;
    this.handlers = handlers;
    this.resumeParam = options.resumeParam || "";
    this.resumeToken = "";
    this.closed = false;
    this.ws = null;
    this.attempt = 0;
    this.timer = 0;
    this.opens = 0; // how many times a socket opened (reconnects are opens - 1)
    this.closes = []; // close codes seen, newest last (for debugging)
  }

  async open() {
    if (this.closed) return;
    let token;
    try {
      token = await session.token();
    } catch {
      this._retry();
      return;
    }
    if (this.closed) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query =
      this.resumeParam && this.resumeToken
        ? `?${this.resumeParam}=${encodeURIComponent(this.resumeToken)}`
        : "";
    const ws = new WebSocket(`${scheme}//${location.host}${this.path}${query}`, ["bearer", token]);
    this.ws = ws;
    let failure = null;
    ws.onopen = () => {
      this.opens += 1;
      this.handlers.onState?.("connected");
    };
    ws.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message.error) {
        failure = message.error;
        return;
      }
      this.attempt = 0;
      this.handlers.onMessage(message);
    };
    ws.onclose = (event) => {
      this.closes = [...this.closes.slice(-9), event.code];
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.closed) return;
      if (event.code === 1000) {
        this.closed = true;
        this.handlers.onEnd?.();
        return;
      }
      const http = event.code >= 4000 && event.code < 5000 ? event.code - 4000 : 0;
      if (http === 401) {
        session.refresh().then(
          () => this._retry(),
          () => this._fail(failure, http),
        );
        return;
      }
      if (http === 400 && this.resumeToken) {
        this.resumeToken = ""; // a stale token: start again from a snapshot
        this._retry();
        return;
      }
      if (http && http !== 429 && http < 500) {
        this._fail(failure, http);
        return;
      }
      this.handlers.onState?.("reconnecting");
      this._retry();
    };
  }

  _fail(status, http) {
    this.closed = true;
    this.handlers.onError?.(status, http);
  }

  _retry() {
    if (this.closed) return;
    const wait = Math.min(MAX_BACKOFF_MS, 250 * 2 ** this.attempt) * (0.75 + Math.random() / 2);
    this.attempt += 1;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), wait);
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000);
    }
  }
}
