// Entry point: the hash router (#/, #/notifications, #/spaces/{id}), sign up / log in,
// the home page (live now, upcoming, start a Space, follow people) and notifications.

import { ApiError, api, eventually, idOf, parseUsd, session } from "./api.js";
import { SpaceView } from "./space.js";
import { Stream } from "./stream.js";
import {
  $,
  busy,
  h,
  loadUsers,
  rememberUser,
  showError,
  shownErrors,
  timeAgo,
  toast,
  userHandle,
  userLabel,
  when,
} from "./ui.js";

const views = ["auth", "home", "notifications", "space"];
let spaceView = null;
let notifications = null;
let unread = 0;
let feedTimer = 0;

function show(view) {
  $("#boot").hidden = true;
  for (const v of views) $(`#view-${v}`).hidden = v !== view;
  $("#nav").hidden = view === "auth";
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function route() {
  const path = location.hash.replace(/^#/, "") || "/";
  clearInterval(feedTimer);
  if (!session.signedIn) {
    if (spaceView) await spaceView.close();
    document.title = "Spaces";
    show("auth");
    $("#form-login").elements.handle.focus();
    return;
  }
  startNotifications();
  $("#me-label").textContent = `${session.user.displayName} @${session.user.handle}`;
  const space = path.match(/^\/spaces\/([a-z0-9][a-z0-9-]{0,62})$/);
  if (!space && spaceView) await spaceView.close();
  if (space) {
    show("space");
    spaceView = spaceView || new SpaceView($("#view-space"));
    $("#main").focus();
    await spaceView.open(space[1]);
    return;
  }
  if (path === "/notifications") {
    document.title = "Notifications · Spaces";
    show("notifications");
    $("#main").focus();
    await loadInbox();
    return;
  }
  document.title = "Spaces";
  show("home");
  await loadHome();
  feedTimer = setInterval(loadFeed, 15_000);
}

// -- sign up / log in --------------------------------------------------------------------

function bindAuth() {
  const tabs = [$("#tab-login"), $("#tab-signup")];
  const select = (tab) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(`#${t.getAttribute("aria-controls")}`).hidden = !on;
    }
  };
  for (const tab of tabs) {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
        const other = tabs[(tabs.indexOf(tab) + 1) % 2];
        select(other);
        other.focus();
      }
    });
  }
  const login = $("#form-login");
  login.addEventListener("submit", (e) => {
    e.preventDefault();
    const f = login.elements;
    if (!login.reportValidity()) return;
    busy(
      login.querySelector("button[type=submit]"),
      async () => {
        const reply = await api.login(f.handle.value.trim(), f.password.value);
        signedIn(reply);
      },
      login,
    );
  });
  const signup = $("#form-signup");
  signup.addEventListener("submit", (e) => {
    e.preventDefault();
    const f = signup.elements;
    if (!signup.reportValidity()) return;
    busy(
      signup.querySelector("button[type=submit]"),
      async () => {
        const reply = await api.createUser(
          f.handle.value.trim(),
          f.displayName.value.trim(),
          f.password.value,
        );
        signedIn(reply);
      },
      signup,
    );
  });
  $("#logout").addEventListener("click", async () => {
    const token = session.refreshToken;
    if (spaceView) await spaceView.close();
    stopNotifications();
    await api.logout(token).catch(() => {});
    session.clear();
    location.hash = "#/";
    route();
  });
}

function signedIn(reply) {
  rememberUser(reply.user);
  session.set(reply.tokens, reply.user);
  for (const form of [$("#form-login"), $("#form-signup")]) form.reset();
  if (!location.hash || location.hash === "#/") route();
  else route();
}

// -- home --------------------------------------------------------------------------------

async function loadHome() {
  await Promise.all([loadFeed(), loadFollowing()]);
}

function spaceCard(item) {
  const s = item.space;
  const counts = s.participantCounts || {};
  const reason = {
    DISCOVERY_REASON_HOSTED_BY_FOLLOWED: "",
    DISCOVERY_REASON_FOLLOWED_PARTICIPATING: `${(item.followedParticipants || [])
      .map(userLabel)
      .join(", ")} listening`,
  }[item.reason];
  return h(
    "li",
    { dataset: { space: s.name } },
    h(
      "a",
      { class: "space-card", href: `#/spaces/${idOf(s.name)}` },
      h("span", { class: "pill" }, "LIVE"),
      h("span", { class: "title" }, s.title),
      h("span", { class: "who" }, `${userLabel(s.host)} ${userHandle(s.host)}`),
      reason ? h("span", { class: "who" }, reason) : "",
      h("span", { class: "count" }, `${counts.totalCount || 0} in the Space`),
    ),
  );
}

async function loadFeed() {
  // Each half shows even when the other fails.
  const [f, m] = await Promise.allSettled([api.discoveryFeed(), api.listMySpaces()]);
  const feed = f.status === "fulfilled" ? f.value.items || [] : [];
  const mine = m.status === "fulfilled" ? m.value.spaces || [] : [];
  for (const r of [f, m]) {
    if (r.status === "rejected" && !(r.reason instanceof ApiError && r.reason.status === 401)) {
      showError(r.reason);
    }
  }
  const live = feed.filter((i) => i.space.state === "SPACE_STATE_LIVE");
  for (const s of mine.filter((x) => x.state === "SPACE_STATE_LIVE")) {
    if (!live.some((i) => i.space.name === s.name)) live.unshift({ space: s, reason: "" });
  }
  const upcoming = [
    ...mine.filter((s) => s.state === "SPACE_STATE_SCHEDULED"),
    ...feed.filter((i) => i.space.state === "SPACE_STATE_SCHEDULED").map((i) => i.space),
  ];
  const seen = new Set();
  const uniqueUpcoming = upcoming
    .filter((s) => !seen.has(s.name) && seen.add(s.name))
    .sort((a, b) => String(a.scheduledStartTime).localeCompare(String(b.scheduledStartTime)));
  await loadUsers([
    ...live.map((i) => i.space.host),
    ...uniqueUpcoming.map((s) => s.host),
    ...live.flatMap((i) => i.followedParticipants || []),
  ]);
  $("#live-row").replaceChildren(...live.map(spaceCard));
  $("#live-empty").hidden = live.length > 0;
  $("#upcoming-list").replaceChildren(
    ...uniqueUpcoming.map((s) =>
      h(
        "li",
        { dataset: { space: s.name } },
        h(
          "span",
          {},
          h("a", { href: `#/spaces/${idOf(s.name)}` }, s.title),
          h("br"),
          h(
            "span",
            { class: "sub" },
            `${userLabel(s.host)} · ${when(s.scheduledStartTime)}${s.ticketed ? " · Ticketed" : ""}`,
          ),
        ),
        h("span", { class: "pill sched" }, "SCHEDULED"),
      ),
    ),
  );
  $("#upcoming-empty").hidden = uniqueUpcoming.length > 0;
}

async function loadFollowing() {
  try {
    const reply = await api.listFollowing();
    const people = reply.following || [];
    for (const u of people) rememberUser(u);
    $("#following-list").replaceChildren(
      ...people.map((u) =>
        h(
          "li",
          {},
          h("span", {}, `${u.displayName} `, h("span", { class: "sub" }, `@${u.handle}`)),
          h(
            "button",
            {
              type: "button",
              class: "link",
              "aria-label": `Unfollow @${u.handle}`,
              onclick: (e) =>
                busy(e.currentTarget, async () => {
                  await api.unfollow(u.name);
                  await loadFollowing();
                }),
            },
            "Unfollow",
          ),
        ),
      ),
    );
    $("#following-empty").hidden = people.length > 0;
  } catch (error) {
    showError(error);
  }
}

function bindHome() {
  $("#refresh-feed").addEventListener("click", (e) => busy(e.currentTarget, loadFeed));
  const follow = $("#form-follow");
  follow.addEventListener("submit", (e) => {
    e.preventDefault();
    const error = $("#follow-error");
    error.textContent = "";
    const handle = follow.elements.handle.value.trim().replace(/^@/, "");
    if (!/^[A-Za-z0-9_]{1,15}$/.test(handle)) {
      error.textContent = "Enter a handle such as @alice.";
      return;
    }
    busy(follow.querySelector("button"), async () => {
      try {
        const user = (await api.lookupUser(handle)).user;
        await api.follow(user.name);
        rememberUser(user);
        toast(`You follow @${user.handle} now.`);
        follow.reset();
        await Promise.all([loadFollowing(), loadFeed()]);
      } catch (err) {
        error.textContent =
          err.status === 404 ? "No one has that handle." : err.friendly || err.message;
      }
    });
  });

  const start = $("#form-start");
  const schedule = start.elements.schedule;
  const syncSchedule = () => {
    $("#schedule-fields").hidden = !schedule.checked;
    $("#start-submit").textContent = schedule.checked ? "Schedule" : "Start now";
    if (schedule.checked && !start.elements.startAt.value) {
      // An hour from now, rounded up to the next quarter hour.
      const quarter = 15 * 60_000;
      const soon = new Date(Math.ceil((Date.now() + 60 * 60_000) / quarter) * quarter);
      const local = new Date(soon.getTime() - soon.getTimezoneOffset() * 60_000);
      start.elements.startAt.value = local.toISOString().slice(0, 16);
    }
  };
  schedule.addEventListener("change", syncSchedule);
  start.addEventListener("submit", (e) => {
    e.preventDefault();
    const f = start.elements;
    const slot = start.querySelector("[data-error]");
    const title = f.title.value.trim();
    if (!title) {
      slot.textContent = "Give your Space a title.";
      f.title.focus();
      return;
    }
    const space = {
      title,
      topics: f.topics.value
        .split(",")
        .map((t) => t.trim())
        .filter(Boolean)
        .slice(0, 3),
      visibility: f.visibility.value,
      recording: f.recording.checked,
    };
    let price = null;
    if (schedule.checked) {
      const at = new Date(f.startAt.value);
      if (Number.isNaN(at.getTime())) {
        slot.textContent = "Pick a start time.";
        return;
      }
      space.scheduledStartTime = at.toISOString();
      if (f.ticketed.checked) {
        price = parseUsd(f.price.value);
        if (!price) {
          slot.textContent = "Enter a ticket price such as 5.00.";
          return;
        }
        space.ticketed = true;
      }
    }
    busy(
      $("#start-submit"),
      async () => {
        const created = (await api.createSpace(space)).space;
        start.reset();
        syncSchedule();
        if (price) {
          try {
            await eventually(
              () => api.createTicketOffering(created.name, price),
              ["SPACE_NOT_FOUND"],
            );
          } catch (error) {
            showError(error); // the Space exists: show it anyway, with the reason
          }
        }
        location.hash = `#/spaces/${idOf(created.name)}`;
      },
      start,
    );
  });
}

// -- notifications -----------------------------------------------------------------------

function setUnread(count) {
  unread = Number(count || 0);
  const badge = $("#unread-badge");
  badge.hidden = unread === 0;
  badge.textContent = String(unread);
  badge.setAttribute("aria-label", `${unread} unread`);
}

function startNotifications() {
  if (notifications) return;
  notifications = new Stream("/v1/users/me/notifications:subscribe", {
    onMessage: (message) => {
      setUnread(message.unreadCount);
      const n = message.notification;
      if (!n) {
        // (Re)subscribed: the stream is live from here, so a fresh list misses nothing.
        if (!$("#view-notifications").hidden) loadInbox();
        return;
      }
      // In the Space itself the live events already said it (a raised hand, ...).
      const watching = spaceView && !$("#view-space").hidden && spaceView.name === n.space;
      if (!(watching && n.kind === "NOTIFICATION_KIND_SPEAK_REQUESTED")) {
        toast(`${n.title}${n.body ? ` — ${n.body}` : ""}`);
      }
      if (!$("#view-notifications").hidden) loadInbox();
      if (n.kind === "NOTIFICATION_KIND_SPACE_STARTED" && !$("#view-home").hidden) loadFeed();
      // The scheduled Space on screen just went live: open it as live.
      const starting = ["NOTIFICATION_KIND_SPACE_STARTED", "NOTIFICATION_KIND_SPACE_REMINDER"];
      if (spaceView && !$("#view-space").hidden && starting.includes(n.kind)) {
        spaceView.refreshIfStarted(n.space);
      }
    },
  });
  notifications.open();
}

function stopNotifications() {
  if (notifications) notifications.close();
  notifications = null;
  setUnread(0);
}

async function loadInbox() {
  try {
    const reply = await api.listNotifications();
    const items = reply.notifications || [];
    $("#notif-list").replaceChildren(
      ...items.map((n) =>
        h(
          "li",
          { class: n.read ? "" : "unread", dataset: { kind: n.kind } },
          h(
            "span",
            {},
            n.space ? h("a", { href: `#/${n.space}` }, n.title) : h("strong", {}, n.title),
            n.body ? h("span", { class: "sub" }, h("br"), n.body) : "",
          ),
          h("time", { class: "sub", datetime: n.createTime }, timeAgo(n.createTime)),
        ),
      ),
    );
    $("#notif-empty").hidden = items.length > 0;
    $("#mark-read").disabled = !items.some((n) => !n.read);
    $("#mark-read").dataset.before = items.length ? items[0].createTime : "";
  } catch (error) {
    showError(error);
  }
}

function bindNotifications() {
  $("#mark-read").addEventListener("click", (e) =>
    busy(e.currentTarget, async () => {
      const before = e.currentTarget.dataset.before;
      if (!before) return;
      const reply = await api.markRead(before);
      setUnread(reply.unreadCount);
      await loadInbox();
    }),
  );
}

// -- start -------------------------------------------------------------------------------

bindAuth();
bindHome();
bindNotifications();
session.addEventListener("change", () => {
  if (!session.signedIn) {
    stopNotifications();
    if (!$("#view-auth").hidden) return;
    route();
  }
});
window.addEventListener("hashchange", route);
window.addEventListener("pagehide", () => {
  if (spaceView) spaceView.close();
});
// A debugging handle (also what the browser tests read media statistics through).
Object.defineProperty(window, "spacesClient", {
  value: Object.freeze({
    get space() {
      return spaceView;
    },
    stats: () => (spaceView ? spaceView.media.audioStats() : null),
    errors: shownErrors,
  }),
});
route();
