// Martinet's dashboard: a small single-page app over the JSON API (/api/v1), polled for live updates.
// No framework and no build step: pages are drawn with the DOM helpers below (text is never parsed as HTML).
"use strict";

(() => {
  const POLL_MS = 1500; // every page's refresh
  const LIVE_TASK_MS = 500; // a task page while its task is not final: the progress bar moves
  const PAGE_SIZE = 50;
  const STATUSES = ["waiting", "scheduled", "queued", "running", "succeeded", "failed", "cancelled"];
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const numbers = new Intl.NumberFormat();
  const session = { role: "read", open: false };

  // ---------- DOM helpers ----------

  function h(tag, attrs, ...children) {
    return build(document.createElement(tag), attrs, children);
  }

  function s(tag, attrs, ...children) {
    return build(document.createElementNS("http://www.w3.org/2000/svg", tag), attrs, children);
  }

  function build(el, attrs, children) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(el.dataset, value);
      else el.setAttribute(key, value === true ? "" : value);
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
  }

  function fill(el, ...children) {
    el.replaceChildren();
    append(el, children);
    return el;
  }

  const ICONS = {
    retry: "M4 4v5h5M20 20v-5h-5M5.5 15a7 7 0 0 0 12.2 2.5M18.5 9A7 7 0 0 0 6.3 6.5",
    cancel: "M6 6l12 12M18 6L6 18",
    play: "M7 5l12 7-12 7z",
    stop: "M6 6h12v12H6z",
    back: "M15 18l-6-6 6-6",
    next: "M9 18l6-6-6-6",
  };

  function icon(name) {
    return s(
      "svg",
      { viewBox: "0 0 24 24", fill: "none", stroke: "currentColor", "stroke-width": 2, "stroke-linecap": "round", "stroke-linejoin": "round", "aria-hidden": "true" },
      s("path", { d: ICONS[name] }),
    );
  }

  // ---------- Formatting ----------

  const fmt = (n) => (n === null || n === undefined ? "—" : numbers.format(n));
  const epoch = (iso) => (iso ? Date.parse(iso) / 1000 : null);
  const now = () => Date.now() / 1000;

  function duration(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
    seconds = Math.max(0, seconds);
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    const total = Math.round(seconds);
    if (total < 60) return `${total} s`;
    const m = Math.floor(total / 60);
    if (m < 10) return `${m} min ${total % 60} s`;
    if (m < 60) return `${m} min`;
    const hrs = Math.floor(m / 60);
    if (hrs < 48) return `${hrs} h ${m % 60} min`;
    return `${Math.floor(hrs / 24)} d ${hrs % 24} h`;
  }

  function relative(iso) {
    const at = epoch(iso);
    if (at === null) return "—";
    const delta = at - now();
    if (Math.abs(delta) < 1) return "just now";
    const text = Math.abs(delta) < 10 ? `${Math.round(Math.abs(delta))} s` : duration(Math.abs(delta));
    return delta > 0 ? `in ${text}` : `${text} ago`;
  }

  function localTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  // A time shown as "3 s ago" (kept current by refreshTimes), its exact local time on hover.
  function when(iso) {
    if (!iso) return h("span", { class: "faint" }, "—");
    return h("time", { datetime: iso, title: localTime(iso), dataset: { ago: iso } }, relative(iso));
  }

  // A time to the millisecond (and its date unless today), as the attempts table shows them: their gaps matter.
  function exact(iso) {
    if (!iso) return h("span", { class: "faint" }, "—");
    const d = new Date(iso);
    const time = `${localTime(iso).slice(11)}.${String(d.getMilliseconds()).padStart(3, "0")}`;
    const today = d.toDateString() === new Date().toDateString();
    return h("time", { datetime: iso, title: localTime(iso) }, today ? time : `${localTime(iso).slice(0, 10)} ${time}`);
  }

  function refreshTimes() {
    for (const el of document.querySelectorAll("[data-ago]")) el.textContent = relative(el.dataset.ago);
    for (const el of document.querySelectorAll("[data-since]")) el.textContent = duration(now() - epoch(el.dataset.since));
  }

  function taskDuration(task) {
    if (task.status === "scheduled") return h("span", { class: "subtle" }, "starts ", when(task.run_at));
    if (!task.started_at) return h("span", { class: "faint" }, "—");
    if (task.finished_at) return duration(epoch(task.finished_at) - epoch(task.started_at));
    if (task.status === "running") return h("span", { dataset: { since: task.started_at } }, duration(now() - epoch(task.started_at)));
    return h("span", { class: "faint" }, "—");
  }

  const badge = (status, big) => h("span", { class: `badge st-${status}${big ? " big" : ""}`, dataset: { status } }, status);

  function progressBar(fraction, status, big) {
    const fillEl = h("span");
    fillEl.style.width = `${Math.round(Math.min(1, Math.max(0, fraction || 0)) * 1000) / 10}%`;
    return h("div", { class: `bar st-${status}${big ? " big" : ""}`, role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round((fraction || 0) * 100) }, fillEl);
  }

  const capital = (word) => word[0].toUpperCase() + word.slice(1);
  const pct = (fraction) => `${Math.round((fraction || 0) * 100)}%`;
  const json = (value) => JSON.stringify(value, null, 2);

  // ---------- The API ----------

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { credentials: "same-origin", ...options, headers: { Accept: "application/json", ...options.headers } });
    } catch (err) {
      throw new ApiError(`cannot reach the Martinet server (${err.message})`, 0);
    }
    if (response.status === 401) { // the session ended (the token changed): log in again
      location.assign(`/login?next=${encodeURIComponent(location.pathname + location.search)}`);
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const message = body && body.error ? body.error.message : `HTTP ${response.status} from ${path}`;
      throw new ApiError(message, response.status);
    }
    return body;
  }

  // Actions are JSON POSTs: the server refuses any other kind from a browser (cross-site protection).
  const post = (path, body) =>
    api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}) });

  const canAct = () => session.role === "admin";

  function listQuery(filters, extra) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries({ ...filters, ...extra })) if (value) query.set(key, value);
    return query.toString();
  }

  // ---------- Feedback: toasts, the connection banner, the live dot ----------

  function toast(message, kind) {
    const el = h("div", { class: `toast ${kind || ""}`, role: kind === "error" ? "alert" : "status" },
      h("div", { class: "msg" }, message),
      h("button", { type: "button", "aria-label": "Dismiss", onclick: () => el.remove() }, "×"));
    document.getElementById("toasts").append(el);
    setTimeout(() => el.remove(), kind === "error" ? 12000 : 5000);
  }

  function connection(error) {
    const banner = document.getElementById("banner");
    const live = document.getElementById("live");
    if (error && error.status === 0) {
      fill(banner, `${error.message}: retrying every ${POLL_MS / 1000} s.`);
      banner.hidden = false;
      live.className = "live down";
      live.textContent = "Offline";
    } else {
      banner.hidden = true;
      live.className = document.hidden ? "live paused" : "live";
      live.textContent = document.hidden ? "Paused" : "Live";
    }
  }

  // Run an action from a button: disabled while it runs, its outcome (or the API's error message) in a toast.
  async function act(button, run, done) {
    button.disabled = true;
    try {
      const result = await run();
      const message = done(result);
      if (message) toast(message);
    } catch (err) {
      toast(err.message, "error");
    } finally {
      button.disabled = false;
      poller.now();
    }
  }

  // ---------- Polling: one loop for the current page, paused while the tab is hidden ----------

  const poller = {
    page: null,
    timer: null,
    busy: false,
    again: false,
    start(page) {
      this.page = page;
      this.now();
    },
    now() {
      clearTimeout(this.timer);
      this.timer = null;
      if (this.busy) this.again = true;
      else this.run();
    },
    async run() {
      const page = this.page;
      this.busy = true;
      let delay = POLL_MS;
      try {
        delay = (await page.refresh()) || POLL_MS;
        connection(null);
      } catch (err) {
        connection(err);
        if (err.status !== 0 && page === this.page) page.failed(err);
      }
      refreshTimes();
      this.busy = false;
      if (this.again || page !== this.page) {
        this.again = false;
        this.run();
      } else if (!document.hidden) {
        this.timer = setTimeout(() => this.run(), delay);
      }
    },
  };

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(poller.timer);
    else poller.now();
    connection(null);
  });

  // Redraw ``el`` from ``value`` only when the value changed, so selections and hovers survive a poll.
  const drawn = new WeakMap();
  function draw(el, value, render) {
    const key = JSON.stringify(value);
    if (drawn.get(el) === key) return;
    drawn.set(el, key);
    fill(el, render(value));
  }

  // ---------- Pages ----------

  // Each page function builds its frame into ``root`` and returns {refresh, failed}: refresh() fetches and draws
  // (its result is the delay before the next poll), failed(err) shows an error of the API in the page.
  function page(refresh, failed) {
    return { refresh, failed };
  }

  // Show an error of the API in ``el`` (and redraw it on the next success).
  const errorInto = (el) => (err) => {
    fill(el, h("div", { class: "notice" }, err.message));
    drawn.delete(el);
  };

  function head(title, ...rest) {
    return h("div", { class: "page-head" }, h("h1", {}, title), ...rest);
  }

  function updated() {
    return h("span", { class: "updated" });
  }

  function stamp(el) {
    el.textContent = `Updated ${new Date().toLocaleTimeString()}`;
  }

  // Overview: counts, the last hour's chart, queue lag, workers and the busiest task names.
  function overviewPage(root) {
    const stampEl = updated();
    const cards = h("div", { class: "cards" });
    const metrics = h("div", { class: "cards metrics" });
    const chart = h("div", { class: "panel-body" });
    const legend = h("div", { class: "legend" });
    const workers = h("div", {});
    const names = h("div", {});
    const problem = h("div", {});
    root.append(
      head("Overview", h("span", { class: "spacer" }), stampEl),
      problem,
      cards,
      metrics,
      h("section", { class: "panel" },
        h("div", { class: "panel-head" }, h("h2", {}, "Finished per minute, last hour"), h("span", { class: "spacer" }), legend),
        chart),
      h("div", { class: "grid" },
        h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", {}, "Workers"), h("span", { class: "spacer" }), h("a", { href: "/workers" }, "All workers")), workers),
        h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", {}, "Task names, last hour")), names)),
    );
    return page(async () => {
      const [stats, fleet] = await Promise.all([api("/api/v1/stats"), api("/api/v1/workers")]);
      fill(problem);
      draw(cards, stats.counts, statusCards);
      const slots = fleet.workers.reduce((sum, w) => sum + w.slots, 0);
      const busy = fleet.workers.reduce((sum, w) => sum + w.busy, 0);
      const lastHour = totals(stats.minutes);
      draw(metrics, { lag: stats.queue_lag, slots, busy, n: fleet.workers.length, lastHour }, metricCards);
      draw(legend, lastHour, legendOf);
      draw(chart, { minutes: stats.minutes, at: Math.floor(stats.at / 60), width: chart.clientWidth }, () => minuteChart(stats, chart.clientWidth));
      draw(workers, byHost(fleet.workers), workerSummary);
      draw(names, stats.names || [], nameTable);
      stamp(stampEl);
    }, errorInto(problem));
  }

  function statusCards(counts) {
    return STATUSES.map((status) =>
      h("a", { class: `card st-${status}`, href: `/tasks?status=${status}`, dataset: { count: status } },
        h("span", { class: "label" }, capital(status)),
        h("span", { class: `count${counts[status] ? " nonzero" : ""}` }, fmt(counts[status] || 0))));
  }

  function totals(minutes) {
    const sum = { succeeded: 0, failed: 0, cancelled: 0 };
    for (const m of minutes || []) for (const key of Object.keys(sum)) sum[key] += m[key] || 0;
    return sum;
  }

  function metricCards({ lag, slots, busy, n, lastHour }) {
    const finished = lastHour.succeeded + lastHour.failed + lastHour.cancelled;
    const failRate = finished ? lastHour.failed / finished : 0;
    return [
      h("div", { class: `card${lag !== null && lag > 60 ? " warn" : ""}`, dataset: { metric: "lag" } },
        h("span", { class: "label" }, "Queue lag"),
        h("span", { class: "count" }, lag === null || lag === undefined ? "—" : duration(lag)),
        h("span", { class: "note" }, lag === null || lag === undefined ? "nothing is waiting in the queue" : "age of the oldest queued task")),
      h("a", { class: `card${n === 0 ? " bad" : ""}`, href: "/workers", dataset: { metric: "slots" } },
        h("span", { class: "label" }, "Busy slots"),
        h("span", { class: "count" }, `${fmt(busy)} / ${fmt(slots)}`),
        h("span", { class: "note" }, n === 0 ? "no worker connected" : `on ${n} worker${n === 1 ? "" : "s"}`)),
      h("a", { class: "card", href: "/tasks?status=failed", dataset: { metric: "hour" } },
        h("span", { class: "label" }, "Finished, last hour"),
        h("span", { class: "count" }, fmt(finished)),
        h("span", { class: `note${failRate > 0.1 ? " bad" : ""}` }, finished ? `${(failRate * 100).toFixed(failRate && failRate < 0.01 ? 2 : 1)}% failed` : "nothing finished yet")),
    ];
  }

  function legendOf(sum) {
    return [
      h("span", {}, h("i", { class: "s-succeeded" }), "Succeeded ", h("b", {}, fmt(sum.succeeded))),
      h("span", {}, h("i", { class: "s-failed" }), "Failed ", h("b", {}, fmt(sum.failed))),
      h("span", {}, h("i", { class: "s-cancelled" }), "Cancelled ", h("b", {}, fmt(sum.cancelled))),
    ];
  }

  // 60 stacked bars, one per minute (oldest left), drawn in SVG at the panel's own width.
  function minuteChart(stats, width) {
    width = Math.max(360, width - 32 || 900);
    const height = 220;
    const pad = { left: 44, right: 8, top: 10, bottom: 24 };
    const current = Math.floor(stats.at / 60) * 60;
    const byMinute = new Map((stats.minutes || []).map((m) => [m.minute, m]));
    const buckets = [];
    for (let i = 59; i >= 0; i--) {
      const minute = current - i * 60;
      const m = byMinute.get(minute) || {};
      buckets.push({ minute, succeeded: m.succeeded || 0, failed: m.failed || 0, cancelled: m.cancelled || 0 });
    }
    const peak = Math.max(...buckets.map((b) => b.succeeded + b.failed + b.cancelled));
    const top = niceCeiling(peak);
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const step = plotW / 60;
    const barW = Math.max(2, step * 0.72);
    const y = (v) => pad.top + plotH - (v / top) * plotH;
    const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": "Tasks finished per minute over the last hour" });
    for (let i = 0; i <= 4; i++) {
      const value = (top / 4) * i;
      svg.append(
        s("line", { class: "grid-line", x1: pad.left, x2: width - pad.right, y1: y(value), y2: y(value) }),
        s("text", { class: "axis-label", x: pad.left - 8, y: y(value) + 4, "text-anchor": "end" }, compact(value)));
    }
    buckets.forEach((b, i) => {
      const x = pad.left + i * step;
      const group = s("g", { class: "minute" },
        s("title", {}, `${clock(b.minute)}: ${b.succeeded} succeeded, ${b.failed} failed, ${b.cancelled} cancelled`),
        s("rect", { class: "hover-zone", x, y: pad.top, width: step, height: plotH }));
      let base = 0;
      for (const series of ["succeeded", "failed", "cancelled"]) {
        const v = b[series];
        if (!v) continue;
        const y0 = y(base);
        const y1 = y(base + v);
        group.append(s("rect", { class: `s-${series}`, x: x + (step - barW) / 2, y: y1, width: barW, height: Math.max(1, y0 - y1), rx: Math.min(2, barW / 3) }));
        base += v;
      }
      svg.append(group);
      if (i % 10 === 0 || i === 59) {
        const label = i === 59 ? "now" : clock(b.minute);
        svg.append(s("text", { class: "axis-label", x: x + step / 2, y: height - 6, "text-anchor": i === 59 ? "end" : "middle" }, label));
      }
    });
    return svg;
  }

  // The top of the y axis: four whole, round steps (1 to 8 times a power of ten) over the peak.
  function niceCeiling(peak) {
    const rough = Math.max(1, peak / 4);
    const magnitude = 10 ** Math.floor(Math.log10(rough));
    for (const f of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) {
      const step = f * magnitude;
      if (step >= rough && Number.isInteger(step)) return 4 * step;
    }
    return 40 * magnitude;
  }

  function compact(value) {
    if (value >= 1e6) return `${+(value / 1e6).toFixed(1)}M`;
    if (value >= 1e4) return `${+(value / 1e3).toFixed(1)}k`;
    return numbers.format(Math.round(value * 10) / 10);
  }

  function clock(epochSeconds) {
    const d = new Date(epochSeconds * 1000);
    return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
  }

  // Workers in a steady order (the API's may change between polls).
  const byHost = (workers) => [...workers].sort((a, b) => a.host.localeCompare(b.host) || a.pid - b.pid || a.id.localeCompare(b.id));

  function slotsBar(worker) {
    const fraction = worker.slots ? Math.min(1, worker.busy / worker.slots) : 0;
    const bar = h("div", { class: `bar slots${worker.busy >= worker.slots ? " full" : ""}` }, h("span"));
    bar.firstChild.style.width = `${fraction * 100}%`;
    return h("div", { class: "bar-line" }, bar, h("span", { class: "pct" }, `${worker.busy}/${worker.slots}`));
  }

  function workerSummary(workers) {
    if (!workers.length) return h("div", { class: "panel-empty" }, "No worker is connected. Start one with ", h("code", {}, "martinet work --handlers DIR"), ".");
    return h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Worker"), h("th", {}, "Busy slots"), h("th", { class: "num" }, "Handlers"), h("th", {}, "Last heartbeat"))),
      h("tbody", {}, workers.map((w) => h("tr", { dataset: { worker: w.id } },
        h("td", {}, h("div", { class: "cell-main" }, `${w.host}:${w.pid}`), h("div", { class: "cell-sub mono" }, w.id)),
        h("td", {}, slotsBar(w)),
        h("td", { class: "num" }, fmt((w.handlers || []).length)),
        h("td", { class: "nowrap" }, when(w.last_seen)))))));
  }

  function nameTable(names) {
    if (!names.length) return h("div", { class: "panel-empty" }, "No task finished in the last hour.");
    const rows = [...names].sort((a, b) => b.succeeded + b.failed + b.cancelled - (a.succeeded + a.failed + a.cancelled));
    return h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Task"), h("th", { class: "num" }, "Succeeded"), h("th", { class: "num" }, "Failed"), h("th", { class: "num" }, "Cancelled"), h("th", { class: "num" }, "Mean run time"))),
      h("tbody", {}, rows.map((n) => {
        const ran = n.succeeded + n.failed;
        return h("tr", {},
          h("td", {}, h("a", { href: `/tasks?name=${encodeURIComponent(n.name)}`, class: "cell-main" }, n.name)),
          h("td", { class: "num" }, fmt(n.succeeded)),
          h("td", { class: "num" }, n.failed ? h("a", { href: `/tasks?status=failed&name=${encodeURIComponent(n.name)}` }, fmt(n.failed)) : "0"),
          h("td", { class: "num" }, fmt(n.cancelled)),
          h("td", { class: "num" }, ran && n.run_seconds !== undefined ? duration(n.run_seconds / ran) : "—"));
      }))));
  }

  // Tasks: filters in the URL (?status=&name=&username=&search=&before=), newest first, a page at a time.
  function tasksPage(root) {
    const params = new URLSearchParams(location.search);
    const filters = { status: params.get("status") || "", name: params.get("name") || "", username: params.get("username") || "", search: params.get("search") || "" };
    let before = params.get("before") || "";
    const newer = []; // the `before` of each page this one was reached from, to go back
    const stampEl = updated();
    const list = h("div", {});
    const pager = h("div", { class: "pager" });
    const chips = h("div", { class: "chips", role: "tablist" });

    const tasksUrl = (extra) => {
      const query = listQuery(filters, extra);
      return `/tasks${query ? `?${query}` : ""}`;
    };
    const syncUrl = () => {
      history.replaceState(null, "", tasksUrl({ before }));
      drawChips();
    };
    const drawChips = () => fill(chips, ["", ...STATUSES].map((status) =>
      h("a", { class: `chip${filters.status === status ? " active" : ""}`, href: tasksUrl({ status }), role: "tab", dataset: { filter: status || "all" },
        onclick: (e) => { e.preventDefault(); filters.status = status; before = ""; newer.length = 0; drawBulk(); syncUrl(); poller.now(); } },
        status ? h("span", { class: `dot st-${status}` }) : null, status ? capital(status) : "All")));

    let typing = null;
    const input = (key, placeholder, type) => h("input", {
      type: type || "text", name: key, placeholder, value: filters[key], "aria-label": placeholder,
      oninput: (e) => {
        filters[key] = e.target.value.trim();
        clearTimeout(typing);
        typing = setTimeout(() => { before = ""; newer.length = 0; syncUrl(); poller.now(); }, 250);
      },
    });

    const bulk = h("div", { class: "actions" });
    const drawBulk = () => {
      if (!canAct()) return fill(bulk);
      const retryable = !filters.status || filters.status === "failed" || filters.status === "cancelled";
      const cancellable = !filters.status || !FINAL.has(filters.status);
      fill(bulk,
        h("button", { type: "button", class: "button", disabled: !retryable, dataset: { bulk: "retry" }, onclick: (e) => bulkAction(e.currentTarget, "retry") }, icon("retry"), "Retry all matching"),
        h("button", { type: "button", class: "button danger", disabled: !cancellable, dataset: { bulk: "cancel" }, onclick: (e) => bulkAction(e.currentTarget, "cancel") }, icon("cancel"), "Cancel all matching"));
    };

    function bulkAction(button, action) {
      const which = describeFilters(filters);
      const verb = action === "retry" ? "Retry every failed or cancelled task" : "Cancel every waiting, scheduled, queued or running task";
      if (!confirm(`${verb} ${which}?`)) return;
      act(button, () => post("/api/v1/tasks/bulk", { action, ...Object.fromEntries(Object.entries(filters).filter(([, v]) => v)) }), (result) => {
        const done = `${action === "retry" ? "Retried" : "Cancelled"} ${fmt(result.done.length)} task${result.done.length === 1 ? "" : "s"}`;
        if (!result.failed.length) return `${done}.`;
        toast(`${done}; ${fmt(result.failed.length)} could not be: ${result.failed[0].error.message || result.failed[0].error}`, "error");
        return null;
      });
    }

    drawChips();
    drawBulk();
    root.append(
      head("Tasks", h("span", { class: "spacer" }), stampEl),
      h("section", { class: "panel" },
        chips,
        h("form", { class: "filters", onsubmit: (e) => e.preventDefault() },
          input("name", "Task name"), input("username", "Username"), input("search", "Search descriptions", "search"),
          h("span", { class: "spacer" }), bulk),
        list, pager),
    );

    const drawPager = (count, nextBefore) => fill(pager,
      h("span", { class: "subtle" }, count ? `${fmt(count)} task${count === 1 ? "" : "s"} on this page, newest first${before ? ` (older than #${before})` : ""}` : ""),
      h("span", { class: "spacer" }),
      h("button", { type: "button", class: "button small", disabled: !before, dataset: { page: "newer" },
        onclick: () => { before = newer.pop() || ""; syncUrl(); poller.now(); } }, icon("back"), "Newer"),
      h("button", { type: "button", class: "button small", disabled: !nextBefore, dataset: { page: "older" },
        onclick: () => { newer.push(before); before = String(nextBefore); syncUrl(); poller.now(); } }, "Older", icon("next")));

    return page(async () => {
      const query = listQuery(filters, { before, limit: PAGE_SIZE });
      const result = await api(`/api/v1/tasks?${query}`);
      draw(list, { tasks: result.tasks, query }, () => taskTable(result.tasks, filters));
      drawPager(result.tasks.length, result.next_before);
      stamp(stampEl);
    }, errorInto(list));
  }

  function describeFilters(filters) {
    const parts = [];
    if (filters.status) parts.push(`with status ${filters.status}`);
    if (filters.name) parts.push(`named ${filters.name}`);
    if (filters.username) parts.push(`of user ${filters.username}`);
    if (filters.search) parts.push(`whose description contains "${filters.search}"`);
    return parts.length ? parts.join(", ") : "in the whole store";
  }

  function taskTable(tasks, filters) {
    if (!tasks.length) {
      const any = Object.values(filters).some(Boolean);
      return h("div", { class: "panel-empty" }, any ? "No task matches these filters." : "No task yet. Submit one with martinet execute NAME, or POST /api/v1/tasks.");
    }
    return h("div", { class: "table-wrap" }, h("table", { class: "tasks" },
      h("thead", {}, h("tr", {}, h("th", {}, "ID"), h("th", {}, "Task"), h("th", {}, "Status"), h("th", {}, "Progress"), h("th", {}, "User"), h("th", {}, "Created"), h("th", { class: "num" }, "Ran for"), h("th", { class: "num" }, "Attempts"))),
      h("tbody", {}, tasks.map((t) => {
        const href = `/tasks/${t.id}`;
        return h("tr", { class: "link-row", dataset: { task: t.id }, onclick: (e) => { if (!e.target.closest("a") && !getSelection().toString()) navigate(href); } },
          h("td", {}, h("a", { class: "id", href }, `#${t.id}`)),
          h("td", {},
            h("a", { class: "cell-main", href }, t.name),
            t.paused ? h("div", { class: "cell-sub", dataset: { paused: "" } }, "paused: not dispatched until resumed") : null,
            t.description ? h("div", { class: "cell-sub", title: t.description }, t.description) : null,
            t.error && FINAL.has(t.status) ? h("div", { class: "cell-err", title: t.error }, t.error) : null,
            t.error && !FINAL.has(t.status) ? h("div", { class: "cell-sub", title: t.error }, `retrying after: ${t.error}`) : null),
          h("td", {}, badge(t.status)),
          h("td", {}, t.status === "running" || (t.progress && t.status !== "succeeded")
            ? h("div", { class: "bar-line" }, progressBar(t.progress, t.status), h("span", { class: "pct" }, pct(t.progress)))
            : h("span", { class: "faint" }, "—")),
          h("td", {}, t.username || h("span", { class: "faint" }, "—")),
          h("td", { class: "nowrap" }, when(t.created_at)),
          h("td", { class: "num nowrap" }, taskDuration(t)),
          h("td", { class: "num" }, fmt(t.attempts)));
      }))));
  }

  // A task: its progress (live), facts, args, result, error and every attempt; cancel and retry.
  function taskPage(root, id) {
    const title = h("div", { class: "title-line" }, h("h1", {}, `Task #${id}`));
    const buttons = h("div", { class: "actions" });
    const bar = progressBar(0, "queued", true);
    const pctEl = h("span", { class: "pct", dataset: { role: "progress" } }, "0%");
    const message = h("div", { class: "progress-message", dataset: { role: "progress-message" } });
    const facts = h("div", { class: "panel-body" });
    const payload = h("div", { class: "grid" });
    const failure = h("div", {});
    const attempts = h("div", {});
    const progressPanel = h("section", { class: "panel progress-panel" }, h("div", { class: "panel-body" }, h("div", { class: "bar-line" }, bar, pctEl), message));
    const body = h("div", { class: "stack" },
      progressPanel,
      h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", {}, "Details")), facts),
      payload, failure,
      h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", {}, "Attempts")), attempts));
    const problem = h("div", {});
    root.append(
      h("div", { class: "crumbs" }, h("a", { href: "/tasks" }, "← Tasks")),
      h("div", { class: "page-head" }, title, h("span", { class: "spacer" }), buttons),
      problem, body);
    body.hidden = true;

    return page(async () => {
      const { task } = await api(`/api/v1/tasks/${id}`);
      fill(problem);
      body.hidden = false;
      draw(title, [task.status, task.name], () => [h("span", { class: "id" }, `#${task.id}`), h("h1", {}, task.name), badge(task.status, true)]);
      document.title = `#${task.id} ${task.name} · Martinet`;
      draw(buttons, [task.status, session.role], () => taskButtons(task));
      bar.className = `bar big st-${task.status}`;
      bar.firstChild.style.width = `${Math.round((task.progress || 0) * 1000) / 10}%`;
      bar.setAttribute("aria-valuenow", Math.round((task.progress || 0) * 100));
      pctEl.textContent = pct(task.progress);
      message.textContent = task.progress_message || progressNote(task);
      // A task that ended without a word of progress has nothing to show there.
      progressPanel.hidden = FINAL.has(task.status) && !task.progress_message;
      draw(facts, factsValue(task), () => taskFacts(task));
      draw(payload, [task.args, task.result, task.status], () => [
        h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", {}, "Arguments")), h("div", { class: "panel-body" }, h("pre", { class: "code", dataset: { role: "args" } }, json(task.args)))),
        h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", {}, "Result")), h("div", { class: "panel-body" },
          task.result === null || task.result === undefined
            ? h("span", { class: "faint" }, task.status === "succeeded" ? "null" : task.status === "failed" ? "None: the task failed." : task.status === "cancelled" ? "None: the task was cancelled." : "No result yet.")
            : h("pre", { class: "code", dataset: { role: "result" } }, json(task.result)))),
      ]);
      draw(failure, [task.error, task.traceback, task.status], () => (task.error || task.traceback
        ? h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", {}, task.status === "failed" ? "Error" : "Latest failure"),
            task.status === "failed" ? null : h("span", { class: "subtle" }, `an earlier attempt failed; the task is ${task.status} now`)), h("div", { class: "panel-body" },
            task.error ? h("p", { class: "error-text", dataset: { role: "error" } }, task.error) : null,
            task.traceback ? h("pre", { class: "code error", dataset: { role: "traceback" } }, task.traceback) : null))
        : null));
      draw(attempts, [task.attempts, task.errors, task.worker, task.started_at, task.finished_at, task.status], () => attemptTable(task));
      return FINAL.has(task.status) ? POLL_MS : LIVE_TASK_MS;
    }, (err) => {
      body.hidden = true; // no such task, or the API failed: its message instead of the task
      errorInto(problem)(err);
    });
  }

  function progressNote(task) {
    if (task.status === "waiting") return `Waiting for task${task.after.length === 1 ? "" : "s"} ${task.after.join(", ")} to succeed.`;
    if (task.status === "queued") return "Waiting for a free worker slot.";
    if (task.status === "scheduled") return `Scheduled to run ${relative(task.run_at)}.`;
    if (task.status === "running") return "Running; the handler has not reported progress.";
    return "";
  }

  function factsValue(task) {
    const { progress, progress_message: _, ...rest } = task;
    return rest;
  }

  function taskButtons(task) {
    if (!canAct()) return null;
    const out = [];
    if (!FINAL.has(task.status)) {
      out.push(h("button", { type: "button", class: "button danger", dataset: { action: "cancel" },
        onclick: (e) => act(e.currentTarget, () => post(`/api/v1/tasks/${task.id}/cancel`), () => `Task #${task.id} cancelled.`) }, icon("stop"), "Cancel"));
    }
    if (task.status === "failed" || task.status === "cancelled") {
      out.push(h("button", { type: "button", class: "button primary", dataset: { action: "retry" },
        onclick: (e) => act(e.currentTarget, () => post(`/api/v1/tasks/${task.id}/retry`), () => `Task #${task.id} queued again.`) }, icon("retry"), "Retry"));
    }
    return out;
  }

  function fact(label, value) {
    return h("div", { class: "fact" }, h("dt", {}, label), h("dd", {}, value === null || value === undefined || value === "" ? h("span", { class: "faint" }, "—") : value));
  }

  function taskFacts(t) {
    return h("dl", { class: "facts" },
      fact("Status", badge(t.status)),
      fact("User", t.username),
      fact("Description", t.description),
      fact("Worker", t.worker ? h("span", { class: "mono" }, t.worker) : null),
      fact("Created", when(t.created_at)),
      fact(t.status === "scheduled" ? "Runs" : "Run at", when(t.run_at)),
      fact("Started", when(t.started_at)),
      fact("Finished", when(t.finished_at)),
      fact("Ran for", taskDuration(t)),
      fact("Attempts", `${fmt(t.attempts)} (${fmt(t.failures)} failed, ${fmt(t.retries)} retr${t.retries === 1 ? "y" : "ies"} allowed)`),
      fact("Priority", fmt(t.priority)),
      fact("Timeout", t.timeout ? duration(t.timeout) : "none"),
      fact("Retry delay", t.retry_delay !== null && t.retry_delay !== undefined ? duration(t.retry_delay) : null),
      fact("Key", t.key ? h("span", { class: "mono" }, t.key) : null),
      fact("After", t.after && t.after.length ? h("span", {}, ...t.after.flatMap((id, i) => [i ? ", " : "", h("a", { href: `/tasks/${id}` }, `#${id}`)])) : null),
      fact("Schedule", t.recurring_id ? h("a", { href: "/recurring" }, `recurring #${t.recurring_id}`) : null),
      fact("Server", t.server ? h("span", { class: "mono" }, t.server) : null));
  }

  // One row per delivery, newest first: failed ones from errors[] (the latest 20 failures are kept, each with
  // its worker and times), the current one from the record, and the next one when a failed task awaits its retry.
  function attemptTable(task) {
    if (!task.attempts) return h("div", { class: "panel-empty" }, task.status === "cancelled" ? "Cancelled before any delivery." : "Not delivered to a worker yet.");
    const failed = new Map((task.errors || []).map((e) => [e.attempt, e]));
    const none = () => h("span", { class: "faint" }, "—");
    const rows = [];
    if (failed.has(task.attempts) && !FINAL.has(task.status)) {
      rows.push(h("tr", { dataset: { attempt: task.attempts + 1 } }, h("td", { class: "num" }, task.attempts + 1), h("td", {}, badge(task.status)),
        h("td", { colspan: 4, class: "subtle" }, "Retry ", when(task.run_at))));
    }
    for (let n = task.attempts; n >= 1; n--) {
      const e = failed.get(n);
      const current = n === task.attempts && !e;
      let outcome = none();
      if (e) outcome = badge("failed");
      else if (current) outcome = badge(task.status);
      else outcome = h("span", { class: "faint", title: "Only failed attempts are recorded (the latest 20)" }, "no record");
      rows.push(h("tr", { dataset: { attempt: n } },
        h("td", { class: "num" }, n),
        h("td", {}, outcome),
        h("td", { class: "mono" }, (e ? e.worker : current ? task.worker : null) || none()),
        h("td", { class: "nowrap" }, e ? exact(e.started_at) : current ? exact(task.started_at) : none()),
        h("td", { class: "nowrap" }, e ? exact(e.at) : current ? exact(task.finished_at) : none()),
        h("td", {}, e ? h("div", { class: "cell-err", title: e.error }, e.error) : null)));
    }
    return h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", { class: "num" }, "#"), h("th", {}, "Outcome"), h("th", {}, "Worker"), h("th", {}, "Started"), h("th", {}, "Ended"), h("th", {}, "Error"))),
      h("tbody", {}, rows)));
  }

  // Recurring schedules: when each runs next and last ran; run one now, or revoke it.
  function recurringPage(root) {
    const stampEl = updated();
    const list = h("div", {});
    root.append(head("Recurring", h("span", { class: "spacer" }), stampEl), h("section", { class: "panel" }, list));
    return page(async () => {
      const { recurring } = await api("/api/v1/recurring");
      const rows = [...recurring].sort((a, b) => b.enabled - a.enabled || b.id - a.id);
      draw(list, [rows, session.role], () => recurringTable(rows));
      stamp(stampEl);
    }, errorInto(list));
  }

  function recurringTable(rows) {
    if (!rows.length) return h("div", { class: "panel-empty" }, "No recurring schedule. Make one with martinet every '5 minutes' NAME, or POST /api/v1/recurring.");
    return h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "ID"), h("th", {}, "Task"), h("th", {}, "Every"), h("th", {}, "Next run"), h("th", {}, "Last run"), h("th", {}, "State"), canAct() ? h("th", {}, "") : null)),
      h("tbody", {}, rows.map((r) => h("tr", { class: r.enabled ? "" : "muted-row", dataset: { recurring: r.id } },
        h("td", { class: "id" }, `#${r.id}`),
        h("td", {}, h("a", { class: "cell-main", href: `/tasks?name=${encodeURIComponent(r.name)}` }, r.name),
          r.paused ? h("div", { class: "cell-sub", dataset: { paused: "" } }, "paused: its runs wait queued") : null,
          r.description ? h("div", { class: "cell-sub" }, r.description) : null),
        h("td", {}, r.interval, r.run_at ? h("div", { class: "cell-sub" }, `at ${r.run_at}`) : null, r.tz ? h("div", { class: "cell-sub" }, r.tz) : null),
        h("td", { class: "nowrap" }, r.enabled ? when(r.next_run_at) : h("span", { class: "faint" }, "—")),
        h("td", { class: "nowrap" }, when(r.last_run_at)),
        h("td", {}, h("span", { class: `badge ${r.enabled ? "on" : "off"}` }, r.enabled ? "active" : "revoked")),
        canAct() ? h("td", {}, h("div", { class: "actions" },
          h("button", { type: "button", class: "button small", dataset: { action: "run" },
            onclick: (e) => act(e.currentTarget, () => post(`/api/v1/recurring/${r.id}/run`), (out) => `Started task #${out.task_id} from schedule #${r.id}.`) }, icon("play"), "Run now"),
          r.enabled ? h("button", { type: "button", class: "button small danger", dataset: { action: "revoke" },
            onclick: (e) => { if (confirm(`Revoke schedule #${r.id} (${r.name} every ${r.interval})? It will not run again.`)) act(e.currentTarget, () => post(`/api/v1/recurring/${r.id}/revoke`), () => `Schedule #${r.id} revoked.`); } }, icon("cancel"), "Revoke") : null)) : null)))));
  }

  // Workers: every worker of the cluster, its slots and when it last reported.
  function workersPage(root) {
    const stampEl = updated();
    const list = h("div", {});
    root.append(head("Workers", h("span", { class: "spacer" }), stampEl), h("section", { class: "panel" }, list));
    return page(async () => {
      const { workers } = await api("/api/v1/workers");
      draw(list, byHost(workers), workerTable);
      stamp(stampEl);
    }, errorInto(list));
  }

  function workerTable(workers) {
    if (!workers.length) return h("div", { class: "panel-empty" }, "No worker is connected. Start one with ", h("code", {}, "martinet work --handlers DIR"), ".");
    return h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Worker"), h("th", {}, "Server"), h("th", {}, "Busy slots"), h("th", { class: "num" }, "Prefetch"), h("th", {}, "Handlers"), h("th", {}, "Last heartbeat"))),
      h("tbody", {}, workers.map((w) => h("tr", { dataset: { worker: w.id } },
        h("td", {}, h("div", { class: "cell-main" }, `${w.host}:${w.pid}`), h("div", { class: "cell-sub mono" }, w.id), w.key ? h("div", { class: "cell-sub" }, `key ${w.key}`) : null),
        h("td", { class: "mono" }, w.server_address || w.server || "—"),
        h("td", {}, slotsBar(w)),
        h("td", { class: "num" }, fmt(w.prefetch)),
        h("td", {}, h("div", { class: "tags" }, (w.handlers || []).map((name) => h("span", { class: "tag" }, name)))),
        h("td", { class: "nowrap" }, when(w.last_seen)))))));
  }

  // ---------- Routing ----------

  const ROUTES = [
    [/^\/$/, "overview", overviewPage],
    [/^\/tasks$/, "tasks", tasksPage],
    [/^\/tasks\/(\d+)$/, "tasks", taskPage],
    [/^\/recurring$/, "recurring", recurringPage],
    [/^\/workers$/, "workers", workersPage],
  ];

  function route(path) {
    for (const [pattern, nav, make] of ROUTES) {
      const match = pattern.exec(path);
      if (match) return { nav, make, arg: match[1] };
    }
    return null;
  }

  function navigate(url) {
    history.pushState(null, "", url);
    render();
  }

  function render() {
    const found = route(location.pathname);
    const view = document.getElementById("view");
    const root = h("div", {});
    view.replaceChildren(root);
    window.scrollTo(0, 0);
    for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", !!found && a.dataset.nav === found.nav);
    if (!found) {
      root.append(head("Not found"), h("div", { class: "notice" }, `The dashboard has no page at ${location.pathname}. `, h("a", { href: "/" }, "Go to the overview.")));
      return;
    }
    document.title = `${found.nav[0].toUpperCase()}${found.nav.slice(1)} · Martinet`;
    poller.start(found.make(root, found.arg));
  }

  document.addEventListener("click", (e) => {
    const a = e.target.closest("a[href]");
    if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey || a.target) return;
    if (a.origin !== location.origin || !route(a.pathname)) return;
    e.preventDefault();
    navigate(a.pathname + a.search);
  });
  window.addEventListener("popstate", render);

  async function start() {
    try {
      const me = await api("/api/v1/whoami");
      session.role = me.role;
      session.open = me.open;
    } catch (err) {
      connection(err);
    }
    const role = document.getElementById("role");
    role.hidden = session.role === "admin";
    role.textContent = "read-only";
    document.getElementById("logout").hidden = session.open;
    document.body.classList.toggle("read-only", !canAct());
    render();
  }

  start();
})();
