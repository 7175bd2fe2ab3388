// The Sync credits button of GET /billing (creditsync). Same-origin, no dependencies, no build step.
// It sends the page's signed instance token (from the page's own ?instance=) to
// POST /api/billing/sync-credits in the x-wix-instance header and says the outcome in words
// in the aria-live status region.
(function () {
  "use strict";
  var SYNC_PATH = "/api/billing/sync-credits";
  var button = document.getElementById("sync-credits");
  var status = document.getElementById("sync-status");
  if (!button || !status) {
    return;
  }
  var token = new URLSearchParams(window.location.search).get("instance") || "";

  function field(name) {
    return document.querySelector('[data-field="' + name + '"]');
  }

  function say(text, kind) {
    status.textContent = text;
    status.className = kind || "";
  }

  // The server's one-line message as a sentence: capital first letter, final full stop.
  function sentence(text) {
    if (!text) {
      return "";
    }
    text = text.charAt(0).toUpperCase() + text.slice(1);
    return /[.!?]$/.test(text) ? text : text + ".";
  }

  function credits(value) {
    return value === 1 ? "1 credit" : String(value) + " credits";
  }

  function describe(side) {
    return side.plan_id + " (" + credits(side.credits_total) + ")";
  }

  function show(side) {
    var used = parseInt(field("credits_used").textContent, 10) || 0;
    field("plan_id").textContent = side.plan_id;
    field("credits_total").textContent = String(side.credits_total);
    field("credits_left").textContent = String(Math.max(0, side.credits_total - used));
  }

  // Seconds to wait, from Retry-After (seconds or an HTTP date), else the body's retry_after.
  function retryAfter(response, body) {
    var header = response.headers.get("Retry-After");
    var seconds = NaN;
    if (header) {
      seconds = /^\d+$/.test(header.trim()) ? parseInt(header, 10) : Math.ceil((Date.parse(header) - Date.now()) / 1000);
    }
    if (!(seconds >= 0) && body && typeof body.retry_after === "number") {
      seconds = body.retry_after;
    }
    return seconds >= 0 ? Math.max(1, seconds) : null;
  }

  function whenText(seconds) {
    var at = new Date(Date.now() + seconds * 1000);
    return "in " + seconds + (seconds === 1 ? " second" : " seconds") + " (at " + at.toLocaleTimeString() + ")";
  }

  function pause(seconds) {
    button.disabled = true;
    window.setTimeout(function () { button.disabled = false; }, seconds * 1000);
  }

  function outcome(response, body) {
    var code = response.status;
    var message = body && typeof body.message === "string" ? body.message : "";
    if (code === 200 && body) {
      if (body.changed) {
        show(body["new"]);
        return ["Updated: your plan changed from " + describe(body.old) + " to " + describe(body["new"]) + ".", "ok"];
      }
      if (body.outcome === "already_correct") {
        show(body["new"]);
        return ["Already correct: billing agrees with your plan, " + describe(body["new"]) + ". Nothing changed.", "ok"];
      }
      if (body.outcome === "skipped") {
        return ["Nothing changed: your plan changed while we checked. Reload the page to see it.", "warn"];
      }
      if (body.outcome === "needs_attention") {
        return ["Nothing changed: billing shows a plan this app cannot apply by itself. Please contact support.", "warn"];
      }
      return [sentence(message) || "Nothing changed.", "warn"];
    }
    if (code === 429) {
      var seconds = retryAfter(response, body);
      if (seconds !== null) {
        pause(seconds);
      }
      var what = body && body.error === "sync_in_progress" ? "A sync is already running." : "Too many syncs in a row.";
      return [what + " Nothing changed. Try again " + (seconds !== null ? whenText(seconds) : "in a minute") + ".", "warn"];
    }
    if (code === 401) {
      if (body && body.error === "expired_token") {
        return ["Your session has expired: reload the app from your dashboard, then try again. Nothing changed.", "error"];
      }
      return ["This page's link is not valid: reload the app from your dashboard. Nothing changed.", "error"];
    }
    if ((code === 502 || code === 503) && body && (body.error === "billing_unavailable" || body.error === "billing_error")) {
      var wait = retryAfter(response, body);
      return ["Billing is not answering right now, so nothing changed. Try again " +
              (wait !== null ? whenText(wait) : "in a few minutes") + ".", "error"];
    }
    if (code === 502 || code === 503) {
      return [sentence(message) || "The service is unavailable right now. Nothing changed. Try again later.", "error"];
    }
    return [sentence(message) || ("Something went wrong (HTTP " + code + "). Nothing changed."), "error"];
  }

  button.addEventListener("click", function () {
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    say("Syncing with billing…", "busy");
    var response = null;
    window.fetch(SYNC_PATH, {
      method: "POST",
      headers: { "x-wix-instance": token },
      credentials: "omit",
      cache: "no-store",
      referrerPolicy: "no-referrer"
    }).then(function (r) {
      response = r;
      return r.json().catch(function () { return null; });
    }).then(function (body) {
      var result = outcome(response, body);
      say(result[0], result[1]);
    }).catch(function () {
      say("Could not reach the server. Check your connection and try again. Nothing changed.", "error");
    }).then(function () {
      button.removeAttribute("aria-busy");
      if (!response || response.status !== 429) {
        button.disabled = false;
      }
    });
  });
}());
