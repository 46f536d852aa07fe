// The dashboard page: reads the JSON API of `podsettle serve` and draws it, polling /api/overview
// every second and refetching the rest when the log position moved (a batch running in any process
// that writes to the store). Amounts arrive as strings and are shown as they arrive; they become
// numbers only to place the chart's lines. Everything the store holds is put in the page as text
// (textContent), never as markup.
"use strict";

(() => {
  const POLL_MS = 1000;
  const SVG = "http://www.w3.org/2000/svg";
  const view = { position: null, batch: "", state: "", job: null, stale: true };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "className") node.className = value;
      else if (name.startsWith("data-")) node.setAttribute(name, value);
      else node[name] = value;
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text != null) node.textContent = text;
    return node;
  }

  function query(params) {
    const found = Object.entries(params).filter(([, value]) => value !== "" && value != null);
    return found.length ? "?" + new URLSearchParams(found).toString() : "";
  }

  async function getJSON(path) {
    const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    return response.json();
  }

  function short(id) { return id ? id.slice(0, 8) : ""; }

  function stateBadge(state) { return el("span", { className: "state " + state }, state.toLowerCase()); }

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  function cell(value, numeric) { return el("td", numeric ? { className: "num" } : {}, value); }

  // ------------------------------------------------------------------ overview and filters

  function renderOverview(data) {
    for (const node of document.querySelectorAll("[data-total]")) {
      node.textContent = data.totals[node.dataset.total];
    }
    $("position").textContent = data.position;
    $("scope").textContent = view.batch ? "totals of batch " + view.batch : "totals of every job";

    const batchSelect = $("batch-filter");
    const known = new Set([...batchSelect.options].map((o) => o.value));
    for (const batch of data.batches) {
      if (batch.batch_id && !known.has(batch.batch_id)) batchSelect.append(el("option", { value: batch.batch_id }, batch.batch_id));
    }
    const stateSelect = $("state-filter");
    if (stateSelect.options.length === 1) {
      for (const state of Object.keys(data.states)) stateSelect.append(el("option", { value: state.toLowerCase() }, state.toLowerCase()));
    }
    for (const option of stateSelect.options) {
      if (option.value) option.textContent = option.value + " (" + (data.states[option.value.toUpperCase()] || 0) + ")";
    }

    fill($("batches").tBodies[0], data.batches.map((b) => {
      const row = el("tr", { "data-batch": b.batch_id || "" },
        cell(b.batch_id || "(no batch)"), cell(b.jobs, true), cell(b.paid_jobs, true), cell(b.refunded_jobs, true),
        cell(b.attention_jobs, true), cell(b.in_flight_jobs, true), cell(b.to_workers, true), cell(b.spent, true));
      if (b.batch_id) {
        row.style.cursor = "pointer";
        row.addEventListener("click", () => { batchSelect.value = b.batch_id; changeFilter(); });
      }
      return row;
    }));
  }

  function changeFilter() {
    view.batch = $("batch-filter").value;
    view.state = $("state-filter").value;
    view.stale = true;
    refresh();
  }

  // ------------------------------------------------------------------ jobs and timeline

  async function loadJobs() {
    const data = await getJSON("/api/jobs" + query({ batch: view.batch, state: view.state, limit: 200 }));
    $("jobs-count").textContent = data.jobs.length < data.count
      ? "the latest " + data.jobs.length + " of " + data.count
      : data.count + (data.count === 1 ? " job" : " jobs");
    fill($("jobs").tBodies[0], data.jobs.map((job) => {
      const open = el("button", { className: "job", type: "button", title: job.job_id, "data-job-id": job.job_id }, short(job.job_id));
      open.addEventListener("click", () => selectJob(job.job_id));
      const row = el("tr", { "data-job-row": job.job_id },
        el("td", {}, open), cell(job.batch_id || ""), cell(job.endpoint_id), el("td", {}, stateBadge(job.state)),
        cell(job.budget, true), cell(job.to_workers, true), cell(job.returned, true), cell(job.still_held, true));
      if (job.job_id === view.job) row.className = "selected";
      return row;
    }));
  }

  function selectJob(jobId) {
    view.job = jobId;
    for (const row of document.querySelectorAll("tr[data-job-row]")) {
      row.className = row.dataset.jobRow === jobId ? "selected" : "";
    }
    loadTimeline().catch(showError);
  }

  function describeFields(fields) {
    return Object.entries(fields)
      .filter(([, value]) => value !== null && value !== "" && !(typeof value === "object" && Object.keys(value).length === 0))
      .map(([name, value]) => name + "=" + (typeof value === "object" ? JSON.stringify(value) : value))
      .join("  ");
  }

  async function loadTimeline() {
    if (!view.job) return;
    const jobId = view.job;
    const data = await getJSON("/api/jobs/" + encodeURIComponent(jobId));
    if (view.job !== jobId) return;  // another job was chosen meanwhile
    $("timeline-job").textContent = short(jobId) + " · " + data.job.state.toLowerCase() + " · " + data.events.length + " events";
    $("timeline").dataset.jobId = jobId;
    $("timeline").replaceChildren(...data.events.map((event) => el("li", { "data-event": event.event, "data-version": event.version },
      el("span", { className: "name" }, event.version + ". " + event.event),
      el("span", { className: "when" }, clock(Date.parse(event.at))),
      el("div", { className: "fields" }, describeFields(event.fields)))));
  }

  // ------------------------------------------------------------------ earnings and attention

  async function loadEarnings() {
    const data = await getJSON("/api/earnings");
    fill($("earnings").tBodies[0], data.earnings.map((e) => el("tr", { "data-payee": e.payee },
      cell(e.payee), cell(e.jobs, true), cell(e.paid_jobs, true), cell(e.to_workers, true), cell(e.bonus_net, true), cell(e.still_held, true))));
  }

  async function loadAttention() {
    const data = await getJSON("/api/attention");
    $("attention-count").textContent = data.attention.length ? String(data.attention.length) : "none";
    fill($("attention").tBodies[0], data.attention.map((job) => {
      const open = el("button", { className: "job", type: "button", title: job.job_id }, short(job.job_id));
      open.addEventListener("click", () => selectJob(job.job_id));
      return el("tr", { "data-attention": job.job_id }, el("td", {}, open), cell(job.step), cell(job.reason), cell(describeFields(job.known || {})));
    }));
  }

  // ------------------------------------------------------------------ chart

  async function loadChart() {
    const data = await getJSON("/api/settled");
    $("chart-to-workers").textContent = data.to_workers;
    $("chart-returned").textContent = data.returned;
    drawChart($("chart"), data);
  }

  function clock(time) {
    const parts = { hour: "2-digit", minute: "2-digit", second: "2-digit", fractionalSecondDigits: 1, hour12: false };
    return new Date(time).toLocaleTimeString([], parts);
  }

  function drawChart(box, data) {
    const width = 900, height = 230, left = 70, right = 16, top = 12, bottom = 28;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img", "aria-label": "money settled over time" });
    const points = data.points;
    if (points.length === 0) {
      chart.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, "nothing settled yet"));
      box.replaceChildren(chart);
      return;
    }
    const times = points.map((p) => Date.parse(p.at));
    let t0 = times[0], t1 = times[times.length - 1];
    if (t1 === t0) { t0 -= 1000; t1 += 1000; }
    const top_ = Math.max(Number(data.to_workers), Number(data.returned)) || 1;
    const x = (t) => left + ((t - t0) / (t1 - t0)) * (width - left - right);
    const y = (v) => height - bottom - (Number(v) / top_) * (height - top - bottom);
    for (const fraction of [0, 0.5, 1]) {
      const gy = height - bottom - fraction * (height - top - bottom);
      chart.append(svg("line", { x1: left, x2: width - right, y1: gy, y2: gy, class: fraction ? "grid" : "axis" }));
    }
    chart.append(svg("line", { x1: left, x2: left, y1: top, y2: height - bottom, class: "axis" }));
    const largest = Number(data.to_workers) >= Number(data.returned) ? data.to_workers : data.returned;
    chart.append(svg("text", { x: left - 6, y: top + 4, "text-anchor": "end", class: "label" }, largest));
    chart.append(svg("text", { x: left - 6, y: height - bottom + 4, "text-anchor": "end", class: "label" }, "0"));
    chart.append(svg("text", { x: left, y: height - 8, class: "label" }, clock(t0)));
    chart.append(svg("text", { x: width - right, y: height - 8, "text-anchor": "end", class: "label" }, clock(t1)));

    // Cumulative sums only change at a point: draw steps, starting from zero at the first point.
    function steps(key) {
      let path = `M ${x(times[0])} ${y(0)}`;
      let previous = "0";
      points.forEach((p, i) => {
        path += ` L ${x(times[i])} ${y(previous)} L ${x(times[i])} ${y(p[key])}`;
        previous = p[key];
      });
      return path + ` L ${x(t1)} ${y(previous)}`;
    }
    const workers = steps("to_workers");
    chart.append(svg("path", { d: workers + ` L ${x(t1)} ${y(0)} Z`, class: "area" }));
    chart.append(svg("path", { d: workers, class: "workers", "data-series": "to_workers" }));
    chart.append(svg("path", { d: steps("returned"), class: "returned", "data-series": "returned" }));
    box.replaceChildren(chart);
  }

  // ------------------------------------------------------------------ polling

  function setLive(ok, message) {
    $("live").className = "live " + (ok ? "ok" : "down");
    $("live-text").textContent = ok ? "live · " + new Date().toLocaleTimeString() : "not reachable: " + message;
  }

  function showError(error) { setLive(false, error.message); }

  let running = null;
  async function refresh() {
    if (running) return running;  // one refresh at a time; a filter change marks the view stale
    running = (async () => {
      try {
        const overview = await getJSON("/api/overview" + query({ batch: view.batch }));
        renderOverview(overview);
        if (view.stale || overview.position !== view.position) {
          view.stale = false;
          await Promise.all([loadJobs(), loadEarnings(), loadAttention(), loadChart(), loadTimeline()]);
          view.position = overview.position;
          // For anyone watching the page (and the tests): what it shows is of this log position.
          document.body.dataset.position = String(overview.position);
        }
        setLive(true);
      } catch (error) {
        showError(error);
      } finally {
        running = null;
      }
    })();
    return running;
  }

  async function loop() {
    await refresh();
    if (view.stale) await refresh();
    setTimeout(loop, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("batch-filter").addEventListener("change", changeFilter);
    $("state-filter").addEventListener("change", changeFilter);
    loop();
  });
})();
