// handoff's console: live updates. A page that follows the stream names it in its body's
// data-live; the server sends phases, rebuild progress and history entries, and this
// script writes them into the page as text (never as markup). A stream starts a little
// before what the page shows, so what it repeats is taken once: a phase never goes
// back, a history entry already shown is skipped.
(function () {
  "use strict";
  var live = document.body.getAttribute("data-live");
  if (!live || !window.EventSource) {
    return;
  }
  var ORDER = { requested: 0, restoring_snapshot: 1, replaying_oplog: 2, completed: 3, failed: 3, cancelled: 3 };
  var checkpoint = Number(document.body.getAttribute("data-checkpoint") || 0);
  // The page lists only some of the jobs moving: those not shown end unseen.
  var capped = document.getElementById("capped") !== null;
  var redraw = null;
  var last = 0;
  var wait = 1000;
  var closed = 0;

  // Draws the page again after `ms` (a move started, stopped or ended).
  function later(ms) {
    if (redraw === null) {
      redraw = setTimeout(function () { location.reload(); }, ms || 1500);
    }
  }
  function rowsOf(move) {
    var all = document.querySelectorAll("tr[data-move][data-job]");
    var out = [];
    for (var i = 0; i < all.length; i++) {
      if (all[i].getAttribute("data-move") === move) {
        out.push(all[i]);
      }
    }
    return out;
  }
  function row(move, job) {
    var rows = rowsOf(move);
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].getAttribute("data-job") === job) {
        return rows[i];
      }
    }
    return null;
  }
  function phaseOf(tr) {
    var el = tr.querySelector(".phase");
    return el ? el.textContent : "";
  }
  function text(tr, cls, value) {
    var el = tr.querySelector("." + cls);
    if (el) {
      el.textContent = value;
    }
  }
  function seen(e) {
    var id = Number(e.lastEventId);
    if (id > last) {
      last = id;
    }
  }
  function onPhase(e) {
    seen(e);
    var d = JSON.parse(e.data);
    var tr = row(d.move, d.job);
    if (!tr) {
      // A job the page does not list reached its end: now and then, the page is drawn
      // again to show where its move stands.
      if (d.final && capped && Number(e.lastEventId) > checkpoint) {
        later(30000);
      }
      return;
    }
    var before = phaseOf(tr);
    if ((ORDER[d.phase] || 0) < (ORDER[before] || 0) || before === d.phase) {
      return;
    }
    text(tr, "phase", d.phase);
    if (d.phase === "completed") {
      tr.querySelector(".progress").value = 1;
    }
    // The move's last shown job reached its end: its standing changed.
    if (d.final && rowsOf(d.move).every(function (r) { return ORDER[phaseOf(r)] === 3; })) {
      later();
    }
  }
  function onProgress(e) {
    var d = JSON.parse(e.data);
    var tr = row(d.move, d.job);
    if (!tr || ORDER[phaseOf(tr)] === 3) {
      return;
    }
    if ((ORDER[d.phase] || 0) > (ORDER[phaseOf(tr)] || 0)) {
      text(tr, "phase", d.phase);
    }
    text(tr, "detail", d.detail);
    tr.querySelector(".progress").value = d.done;
  }
  function onEntry(e) {
    seen(e);
    var d = JSON.parse(e.data);
    var body = document.getElementById("entries");
    if (!body) {
      return;
    }
    var shown = body.querySelectorAll("tr[data-seq]");
    if (shown.length && Number(shown[shown.length - 1].getAttribute("data-seq")) >= d.seq) {
      return;
    }
    var tr = document.createElement("tr");
    tr.setAttribute("data-seq", String(d.seq));
    [d.seq, d.at, d.actor, d.event, d.what].forEach(function (value) {
      var td = document.createElement("td");
      td.textContent = String(value);
      tr.appendChild(td);
    });
    body.appendChild(tr);
  }
  // Opens the stream; if the browser gives it up (an error answer), opens it again
  // later, from the last event it had.
  function open() {
    var url = live;
    if (last > 0) {
      url = url.replace(/([?&])after=\d+/, "$1after=" + last);
    }
    var source = new EventSource(url);
    source.addEventListener("open", function () { wait = 1000; closed = 0; });
    source.addEventListener("at", seen);
    source.addEventListener("phase", onPhase);
    source.addEventListener("progress", onProgress);
    source.addEventListener("changed", function (e) {
      seen(e);
      // What the page's views already held changes nothing.
      if (Number(e.lastEventId) > checkpoint) {
        later();
      }
    });
    source.addEventListener("entry", onEntry);
    source.addEventListener("error", function () {
      if (source.readyState === EventSource.CLOSED) {
        closed += 1;
        // Refused again and again (the console restarted: a new token): the page anew.
        if (closed >= 5) {
          location.reload();
          return;
        }
        setTimeout(open, wait);
        wait = Math.min(wait * 2, 30000);
      }
    });
  }
  open();
})();
