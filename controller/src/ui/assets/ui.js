// Ironmesh web UI: live updates without a framework.
//
// The page's live part (<main id="live" data-topics="...">) is re-fetched
// (header X-UI-Fragment: 1) when /events names one of its topics, at most
// every 300 ms, and not while a form control inside it has focus. A
// <pre data-log-stream="URL"> appends the lines of that event stream.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) return;
  var topics = (live.getAttribute("data-topics") || "").split(/\s+/).filter(Boolean);
  var timer = null;
  var busy = false;

  function editing() {
    var a = document.activeElement;
    return a && live.contains(a) && /^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName);
  }

  function refresh() {
    timer = null;
    if (busy || editing()) { schedule(1000); return; }
    busy = true;
    fetch(location.pathname + location.search, {
      headers: { "X-UI-Fragment": "1" },
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (r) {
      if (r.status === 401) { location.reload(); return null; }
      return r.ok ? r.text() : null;
    }).then(function (html) {
      if (html !== null && html !== undefined) {
        live.innerHTML = html;
        live.setAttribute("data-refreshed", String(Date.now()));
      }
    }).catch(function () { }).then(function () { busy = false; });
  }

  function schedule(ms) {
    if (!timer) timer = setTimeout(refresh, ms || 300);
  }

  if (topics.length && window.EventSource) {
    var es = new EventSource("/events");
    es.addEventListener("change", function (e) {
      if (e.data === "all" || topics.indexOf(e.data) >= 0) schedule();
    });
  }

  var logs = document.querySelectorAll("pre[data-log-stream]");
  Array.prototype.forEach.call(logs, function (pre) {
    if (!window.EventSource) return;
    var src = new EventSource(pre.getAttribute("data-log-stream"));
    src.addEventListener("log", function (e) {
      var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.appendChild(document.createTextNode(e.data + "\n"));
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    });
    src.addEventListener("end", function () { src.close(); });
  });
})();
