// The gateway's HTTP/JSON API: tokens, refresh, idempotency keys and errors.
//
// Tokens live in memory and in sessionStorage (this tab only, gone when it closes), never
// in localStorage or cookies. An access token is refreshed shortly before it expires and
// again when a call answers 401; refreshes are single-flight because refresh tokens
// rotate (a reused one revokes the whole family).

const STORAGE_KEY = "spaces.session.v1";
const REFRESH_EARLY_MS = 60_000;

/** A failed call: the HTTP status and the google.rpc.Status body the gateway sends. */
export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
    const details = (body && body.details) || [];
    const info = details.find((d) => String(d["@type"]).endsWith("google.rpc.ErrorInfo")) || {};
    this.reason = info.reason || "";
    this.metadata = info.metadata || {};
    const bad = details.find((d) => String(d["@type"]).endsWith("google.rpc.BadRequest"));
    this.violations = (bad && bad.fieldViolations) || [];
  }

  /** A sentence for people, from the reason when we know it. */
  get friendly() {
    const known = {
      HANDLE_TAKEN: "That handle is taken.",
      INVALID_CREDENTIALS: "Wrong handle or password.",
      USER_NOT_FOUND: "No one has that handle.",
      TICKET_REQUIRED: "This Space needs a ticket.",
      HOST_ALREADY_LIVE: "You are already hosting a live Space.",
      NO_MEDIA_CAPACITY: "No audio server has room right now; try again in a moment.",
      SPACE_NOT_LIVE: "This Space is not live.",
      CAPTIONS_UNAVAILABLE: "Captions are not available in this Space.",
      CARD_DECLINED:
        {
          card_declined: "The card was declined.",
          insufficient_funds: "The card was declined: insufficient funds.",
          incorrect_number: "That card number is not valid.",
          invalid_token: "That payment method is not valid.",
        }[this.metadata.decline_code] || "The card was declined.",
      RATE_LIMITED: "Too many requests; slow down a little.",
    };
    if (known[this.reason]) return known[this.reason];
    if (this.violations.length) {
      return this.violations.map((v) => `${v.field}: ${v.description}`).join("; ");
    }
    return this.message;
  }
}

/** A random UUID (idempotency keys), also outside secure contexts. */
export function uuid() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

class Session extends EventTarget {
  constructor() {
    super();
    this.user = null;
    this.accessToken = "";
    this.accessExpire = 0;
    this.refreshToken = "";
    this._refreshing = null;
    this._timer = 0;
    this._load();
  }

  get signedIn() {
    return Boolean(this.refreshToken && this.user);
  }

  /** Tokens from Login/CreateUser/RefreshToken. */
  set(tokens, user) {
    this.accessToken = tokens.accessToken;
    this.accessExpire = Date.parse(tokens.accessTokenExpireTime) || Date.now() + 5 * 60_000;
    this.refreshToken = tokens.refreshToken;
    if (user) this.user = user;
    this._save();
    this._schedule();
    this.dispatchEvent(new Event("change"));
  }

  clear() {
    this.user = null;
    this.accessToken = "";
    this.refreshToken = "";
    this.accessExpire = 0;
    clearTimeout(this._timer);
    sessionStorage.removeItem(STORAGE_KEY);
    this.dispatchEvent(new Event("change"));
  }

  /** A valid access token, refreshing first when it is about to expire. */
  async token() {
    if (!this.refreshToken) return "";
    if (Date.now() > this.accessExpire - REFRESH_EARLY_MS / 2) await this.refresh();
    return this.accessToken;
  }

  refresh() {
    if (!this._refreshing) {
      this._refreshing = (async () => {
        try {
          const reply = await rawCall("POST", "/v1/auth:refresh", {
            refreshToken: this.refreshToken,
          });
          this.set(reply.tokens);
        } catch (error) {
          if (error instanceof ApiError && (error.status === 401 || error.status === 400)) {
            this.clear(); // the family was revoked or the token expired: log in again
          }
          throw error;
        } finally {
          this._refreshing = null;
        }
      })();
    }
    return this._refreshing;
  }

  _schedule() {
    clearTimeout(this._timer);
    const wait = Math.max(5_000, this.accessExpire - Date.now() - REFRESH_EARLY_MS);
    this._timer = setTimeout(() => this.refresh().catch(() => {}), wait);
  }

  _save() {
    const data = {
      user: this.user,
      accessToken: this.accessToken,
      accessExpire: this.accessExpire,
      refreshToken: this.refreshToken,
    };
    sessionStorage.setItem(STORAGE_KEY, JSON.stringify(data));
  }

  _load() {
    try {
      const data = JSON.parse(sessionStorage.getItem(STORAGE_KEY) || "null");
      if (data && data.refreshToken) {
        Object.assign(this, data);
        this._schedule();
      }
    } catch {
      sessionStorage.removeItem(STORAGE_KEY);
    }
  }
}

export const session = new Session();

async function rawCall(method, path, body, token, keepalive = false) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    keepalive, // leave calls: they must outlive a closing tab
  });
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { message: text.slice(0, 200) };
    }
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data || {};
}

/** Calls the API as the signed-in user; retries once after refreshing on 401. */
export async function call(method, path, body, { keepalive = false } = {}) {
  const token = await session.token();
  try {
    return await rawCall(method, path, body, token, keepalive);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401 && session.refreshToken) {
      await session.refresh();
      return rawCall(method, path, body, session.accessToken, keepalive);
    }
    throw error;
  }
}

/** Calls that need no token (sign up, log in). */
export const publicCall = (method, path, body) => rawCall(method, path, body, "");

const q = (params) => {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    for (const v of Array.isArray(value) ? value : [value]) {
      if (v !== undefined && v !== null && v !== "") search.append(key, String(v));
    }
  }
  const text = search.toString();
  return text ? `?${text}` : "";
};

/**
 * Runs `attempt` again while it fails with one of `reasons`: payments learns about Spaces
 * and stages from rooms' events, a moment after rooms answered. Each attempt mints its
 * own idempotency key (these refusals moved no money), so a refusal is never replayed.
 */
export async function eventually(attempt, reasons, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  let wait = 200;
  for (;;) {
    try {
      return await attempt();
    } catch (error) {
      const retry = error instanceof ApiError && reasons.includes(error.reason);
      if (!retry || Date.now() + wait > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, wait));
      wait = Math.min(wait * 2, 2000);
    }
  }
}

/** `spaces/abc` → `abc`. */
export const idOf = (name) =>
  String(name || "")
    .split("/")
    .pop();

// One function per RPC the client uses, named after it.
export const api = {
  createUser: (handle, displayName, password) =>
    publicCall("POST", "/v1/users", {
      user: { handle, displayName },
      password,
      requestId: uuid(),
    }),
  login: (handle, password) => publicCall("POST", "/v1/auth:login", { handle, password }),
  logout: (refreshToken) => call("POST", "/v1/auth:logout", { refreshToken }),
  getUser: (name) => call("GET", `/v1/${name}`),
  batchGetUsers: (names) => call("GET", `/v1/users:batchGet${q({ names })}`),
  lookupUser: (handle) => call("GET", `/v1/users:lookup${q({ handle })}`),
  follow: (name) => call("POST", `/v1/${name}:follow`, {}),
  unfollow: (name) => call("POST", `/v1/${name}:unfollow`, {}),
  listFollowing: () => call("GET", "/v1/users/me/following?pageSize=100"),

  discoveryFeed: () => call("GET", "/v1/users/me/discoveryFeed?pageSize=50"),
  listMySpaces: () => call("GET", "/v1/spaces?host=users/me&pageSize=50"),
  createSpace: (space) => call("POST", "/v1/spaces", { space, requestId: uuid() }),
  getSpace: (name) => call("GET", `/v1/${name}`),
  startSpace: (name) => call("POST", `/v1/${name}:start`, {}),
  endSpace: (name) => call("POST", `/v1/${name}:end`, {}),
  cancelSpace: (name) => call("POST", `/v1/${name}:cancel`, {}),
  joinSpace: (name) => call("POST", `/v1/${name}:join`, { requestId: uuid() }),
  leaveSpace: (name) => call("POST", `/v1/${name}:leave`, {}, { keepalive: true }),
  requestToSpeak: (name) => call("POST", `/v1/${name}:requestToSpeak`, {}),
  cancelSpeakRequest: (name) => call("POST", `/v1/${name}:cancelSpeakRequest`, {}),
  approveSpeaker: (participant) => call("POST", `/v1/${participant}:approveSpeaker`, {}),
  denySpeaker: (participant) => call("POST", `/v1/${participant}:denySpeaker`, {}),
  revokeSpeaker: (participant) => call("POST", `/v1/${participant}:revokeSpeaker`, {}),
  muteParticipant: (participant) => call("POST", `/v1/${participant}:mute`, {}),
  setOwnMute: (name, muted) => call("POST", `/v1/${name}:setOwnMute`, { muted }),
  setCaptions: (name, enabled) => call("POST", `/v1/${name}:setCaptionsEnabled`, { enabled }),
  sendReaction: (name, emoji) => call("POST", `/v1/${name}:sendReaction`, { emoji }),
  createReminder: (name) => call("POST", `/v1/${name}/reminders`, {}),

  createTicketOffering: (name, price) =>
    call("POST", `/v1/${name}/ticketOffering`, {
      ticketOffering: { price, capacity: 1000 },
      requestId: uuid(),
    }),
  getTicketOffering: (name) => call("GET", `/v1/${name}/ticketOffering`),
  purchaseTicket: (name, price, paymentMethod) =>
    call("POST", `/v1/${name}/tickets`, { requestId: uuid(), price, paymentMethod }),
  sendTip: (name, recipient, amount, paymentMethod, message) =>
    call("POST", `/v1/${name}/tips`, {
      requestId: uuid(),
      recipient,
      amount,
      paymentMethod,
      message,
    }),

  listNotifications: () => call("GET", "/v1/users/me/notifications?pageSize=50"),
  unreadCount: () => call("GET", "/v1/users/me/notifications:countUnread"),
  markRead: (beforeTime) => call("POST", "/v1/users/me/notifications:markRead", { beforeTime }),

  listRecordings: (name) => call("GET", `/v1/${name}/recordings`),
  /** A ready recording's bytes as a Blob (an <audio> cannot send our Authorization). */
  readRecording: async (name) => {
    const token = await session.token();
    const response = await fetch(`/v1/${name}:read`, {
      headers: { Authorization: `Bearer ${token}` },
    });
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    return response.blob();
  },

  negotiate: (node, grant, sdpOffer) =>
    call("POST", `/v1/${node}/sessions:negotiate`, { grant, sdpOffer }),
  restartIce: (session, sdpOffer) => call("POST", `/v1/${session}:restartIce`, { sdpOffer }),
  leaveSession: (session) => call("POST", `/v1/${session}:leave`, {}, { keepalive: true }),
};

/** Money → "$5.00". */
export function formatMoney(money) {
  if (!money) return "";
  const minor = Number(money.amountMinor || 0);
  try {
    return new Intl.NumberFormat(undefined, {
      style: "currency",
      currency: money.currencyCode || "USD",
    }).format(minor / 100);
  } catch {
    return `${(minor / 100).toFixed(2)} ${money.currencyCode}`;
  }
}

/** "5", "5.5", "$5.00" → Money in USD minor units, or null. */
export function parseUsd(text) {
  const clean = String(text).replace(/[$,\s]/g, "");
  if (!/^\d+(\.\d{1,2})?$/.test(clean)) return null;
  const minor = Math.round(Number(clean) * 100);
  return { amountMinor: String(minor), currencyCode: "USD" };
}
