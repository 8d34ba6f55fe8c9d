// handoff's console: live updates. A page that follows the stream names it in its body's
// data-live; the server sends phases, rebuild progress and history entries, and this
// script writes them into the page as text (never as markup).
(function () {
  "use strict";
  var live = document.body.getAttribute("data-live");
  if (!live || !window.EventSource) {
    return;
  }
  var source = new EventSource(live);
  var redraw = null;
  // Draws the page again a little later (a move started or ended): at most once a while.
  function later() {
    if (redraw === null) {
      redraw = setTimeout(function () { location.reload(); }, 1500);
    }
  }
  function row(move, job) {
    var rows = document.querySelectorAll("tr[data-move][data-job]");
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].getAttribute("data-move") === move && rows[i].getAttribute("data-job") === job) {
        return rows[i];
      }
    }
    return null;
  }
  function text(tr, cls, value) {
    var el = tr.querySelector("." + cls);
    if (el) {
      el.textContent = value;
    }
  }
  source.addEventListener("phase", function (e) {
    var d = JSON.parse(e.data);
    var tr = row(d.move, d.job);
    if (tr) {
      text(tr, "phase", d.phase);
      if (d.phase === "completed") {
        tr.querySelector(".progress").value = 1;
      }
    }
    if (d.final || !tr) {
      later();
    }
  });
  source.addEventListener("progress", function (e) {
    var d = JSON.parse(e.data);
    var tr = row(d.move, d.job);
    if (tr) {
      text(tr, "phase", d.phase);
      text(tr, "detail", d.detail);
      tr.querySelector(".progress").value = d.done;
    }
  });
  source.addEventListener("changed", later);
  source.addEventListener("entry", function (e) {
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
  });
})();
