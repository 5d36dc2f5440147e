// Small DOM helpers: elements built with textContent only (never innerHTML), toasts,
// relative times and a cache of user names.

import { api } from "./api.js";

export const $ = (selector, root = document) => root.querySelector(selector);

/** h("li", {class: "x", dataset: {a: 1}, onclick}, "text", child) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Error toasts shown so far (read by the browser tests, handy in the console too). */
export const shownErrors = [];

export function toast(text, kind = "") {
  if (kind === "error") shownErrors.push(text);
  const el = h("div", { class: `toast ${kind}` }, text);
  const box = $("#toasts");
  box.append(el);
  while (box.children.length > 3) box.firstElementChild.remove();
  setTimeout(() => el.remove(), kind === "error" ? 6000 : 4000);
}

/** Shows an error in a form's [data-error] (or as a toast) and returns it. */
export function showError(error, where) {
  const text =
    error && error.friendly
      ? error.friendly
      : String(error && error.message ? error.message : error);
  const slot = where && where.querySelector("[data-error]");
  if (slot) slot.textContent = text;
  else toast(text, "error");
  return text;
}

/** Runs an async action with its button disabled and errors shown. */
export async function busy(button, action, errorPlace) {
  if (button) button.disabled = true;
  const slot = errorPlace && errorPlace.querySelector("[data-error]");
  if (slot) slot.textContent = "";
  try {
    return await action();
  } catch (error) {
    showError(error, errorPlace);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

export function timeAgo(iso) {
  const then = Date.parse(iso);
  if (!then) return "";
  const s = Math.round((Date.now() - then) / 1000);
  const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  if (Math.abs(s) < 60) return rtf.format(-s, "second");
  if (Math.abs(s) < 3600) return rtf.format(-Math.round(s / 60), "minute");
  if (Math.abs(s) < 86400) return rtf.format(-Math.round(s / 3600), "hour");
  return rtf.format(-Math.round(s / 86400), "day");
}

export function when(iso) {
  const t = Date.parse(iso);
  if (!t) return "";
  return new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" }).format(t);
}

export function initials(text) {
  const words = String(text || "?")
    .trim()
    .split(/\s+/);
  return ((words[0] || "?")[0] + (words[1] ? words[1][0] : "")).toUpperCase();
}

// users/{id} → {handle, displayName}; fetched in batches, cached for the page's life.
const users = new Map();
const pending = new Map();

export function rememberUser(user) {
  if (user && user.name) users.set(user.name, user);
}

export function userLabel(name) {
  const user = users.get(name);
  return user ? user.displayName || `@${user.handle}` : "…";
}

export function userHandle(name) {
  const user = users.get(name);
  return user ? `@${user.handle}` : "";
}

/** Makes sure the names are known; resolves when they are (errors ignored). */
export async function loadUsers(names) {
  const missing = [...new Set(names)].filter((n) => n && !users.has(n) && !pending.has(n));
  const waits = [...new Set(names)].filter((n) => pending.has(n)).map((n) => pending.get(n));
  for (let i = 0; i < missing.length; i += 100) {
    const batch = missing.slice(i, i + 100);
    const p = api
      .batchGetUsers(batch)
      .then((reply) => (reply.users || []).forEach(rememberUser))
      .catch(() => {})
      .finally(() => batch.forEach((n) => pending.delete(n)));
    batch.forEach((n) => pending.set(n, p));
    waits.push(p);
  }
  await Promise.all(waits);
}

export const EMOJI = {
  EMOJI_PLUS_ONE: "👍",
  EMOJI_HEART: "❤️",
  EMOJI_JOY: "😂",
  EMOJI_CLAP: "👏",
  EMOJI_FIRE: "🔥",
  EMOJI_HUNDRED: "💯",
  EMOJI_RAISED_HANDS: "🙌",
  EMOJI_THINKING: "🤔",
  EMOJI_WAVE: "👋",
  EMOJI_CRY: "😢",
  EMOJI_VICTORY: "✌️",
  EMOJI_RAISED_FIST: "✊",
};

export const EMOJI_NAMES = {
  EMOJI_PLUS_ONE: "thumbs up",
  EMOJI_HEART: "heart",
  EMOJI_JOY: "laughing",
  EMOJI_CLAP: "clap",
  EMOJI_FIRE: "fire",
  EMOJI_HUNDRED: "hundred",
  EMOJI_RAISED_HANDS: "raised hands",
  EMOJI_THINKING: "thinking",
  EMOJI_WAVE: "wave",
  EMOJI_CRY: "crying",
  EMOJI_VICTORY: "victory",
  EMOJI_RAISED_FIST: "raised fist",
};

export const ROLE_LABEL = {
  PARTICIPANT_ROLE_HOST: "Host",
  PARTICIPANT_ROLE_CO_HOST: "Co-host",
  PARTICIPANT_ROLE_SPEAKER: "Speaker",
  PARTICIPANT_ROLE_LISTENER: "Listener",
};

export const ON_STAGE = new Set([
  "PARTICIPANT_ROLE_HOST",
  "PARTICIPANT_ROLE_CO_HOST",
  "PARTICIPANT_ROLE_SPEAKER",
]);

export const MODERATORS = new Set(["PARTICIPANT_ROLE_HOST", "PARTICIPANT_ROLE_CO_HOST"]);

const ICONS = {
  mic: [
    "M12 2a3 3 0 0 0-3 3v7a3 3 0 0 0 6 0V5a3 3 0 0 0-3-3z",
    "M19 10v2a7 7 0 0 1-14 0v-2",
    "M12 19v3",
  ],
  micOff: [
    "M2 2l20 20",
    "M9 9v3a3 3 0 0 0 5.1 2.1",
    "M15 9.3V5a3 3 0 0 0-5.9-.7",
    "M17 16.9A7 7 0 0 1 5 12v-2",
    "M19 10v2c0 .8-.1 1.5-.4 2.2",
    "M12 19v3",
  ],
  hand: [
    "M18 11V6a2 2 0 0 0-4 0v5",
    "M14 10V4a2 2 0 0 0-4 0v6",
    "M10 10.5V6a2 2 0 0 0-4 0v8",
    "M18 8a2 2 0 1 1 4 0v6a8 8 0 0 1-8 8h-2c-2.8 0-4.5-.9-6-2.4l-3.6-3.6a2 2 0 0 1 2.8-2.8L7 15",
  ],
};

/** A decorative line icon (mic, micOff, hand); text beside it carries the meaning. */
export function icon(name) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", "icon");
  svg.setAttribute("aria-hidden", "true");
  for (const d of ICONS[name] || []) {
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", d);
    svg.append(path);
  }
  return svg;
}
