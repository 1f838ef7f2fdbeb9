// breakglass console: live countdowns, the copy button and the replay
// player. Every page works without this file except those three.
"use strict";
(function () {
  function left(ms) {
    if (ms <= 0) return "0s";
    var s = Math.floor(ms / 1000);
    var d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    s = s % 60;
    var out = "";
    if (d) out += d + "d";
    if (h) out += h + "h";
    if (m) out += m + "m";
    if (s || !out) out += s + "s";
    return out;
  }
  function tick() {
    var now = Date.now();
    var els = document.querySelectorAll("time.countdown[datetime]");
    for (var i = 0; i < els.length; i++) {
      var at = Date.parse(els[i].getAttribute("datetime"));
      if (!isNaN(at)) {
        els[i].textContent = left(at - now);
        if (at <= now) els[i].classList.add("passed");
      }
    }
  }
  function copyButtons() {
    var buttons = document.querySelectorAll("button[data-copy]");
    for (var i = 0; i < buttons.length; i++) {
      var b = buttons[i];
      b.hidden = false;
      b.addEventListener("click", function (ev) {
        var btn = ev.currentTarget;
        var field = document.getElementById(btn.getAttribute("data-copy"));
        if (!field) return;
        field.select();
        var done = function () { btn.textContent = "Copied"; };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(field.value).then(done, function () { document.execCommand("copy"); done(); });
        } else {
          document.execCommand("copy");
          done();
        }
      });
    }
  }
  function player() {
    var el = document.querySelector("[data-cast-src]");
    if (!el || !window.AsciinemaPlayer) return;
    var src = el.getAttribute("data-cast-src");
    fetch(src, { credentials: "same-origin" }).then(function (r) {
      return r.text().then(function (body) { return { ok: r.ok, body: body }; });
    }).then(function (r) {
      if (!r.ok) {
        var doc = new DOMParser().parseFromString(r.body, "text/html");
        var p = doc.querySelector(".problem");
        var msg = document.createElement("p");
        msg.className = "problem";
        msg.setAttribute("role", "alert");
        msg.textContent = p ? p.textContent : "the recording cannot be played";
        el.appendChild(msg);
        return;
      }
      window.AsciinemaPlayer.create({ data: r.body }, el, { fit: "width" });
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    tick();
    setInterval(tick, 1000);
    copyButtons();
    player();
  });
})();
