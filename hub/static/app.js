/* The demo page: submit a generation, follow its channel with HubClient, and survive reloads.
 *
 * The page keeps the generation it follows in sessionStorage: its events URL, the text so far and the id of the last
 * event that text includes, written together after every event. A reload resumes from that id, so the rebuilt text
 * is the same, with no token lost or doubled.
 */
(function () {
  "use strict";

  var STORE_KEY = "sse-hub-demo";
  var DEFAULT_MODELS = { demo: "demo", openai: "gpt-4o-mini", anthropic: "claude-3-5-haiku-latest", gemini: "gemini-1.5-flash" };
  var LABELS = {
    idle: "idle",
    connecting: "connecting…",
    streaming: "streaming",
    reconnecting: "reconnecting…",
    resumed: "resumed",
    finished: "finished",
    error: "error",
  };
  var RESETS = {
    trimmed: "The start of this answer is no longer kept by the hub; showing what remains.",
    expired: "This answer has expired on the hub.",
    unknown_position: "The hub lost part of this answer; showing what it still has.",
    deleted: "This answer was deleted.",
    restarted: "The worker writing this answer was replaced; the answer starts again.",
  };

  var el = {
    form: document.getElementById("ask"),
    prompt: document.getElementById("prompt"),
    provider: document.getElementById("provider"),
    model: document.getElementById("model"),
    send: document.getElementById("send"),
    stop: document.getElementById("stop"),
    clear: document.getElementById("clear"),
    state: document.getElementById("state"),
    generation: document.getElementById("generation"),
    notice: document.getElementById("notice"),
    answer: document.getElementById("answer"),
  };

  var current = null; // {id, channel, events_url, text, lastEventId, status, notice}
  var subscription = null;

  function save() {
    if (current) sessionStorage.setItem(STORE_KEY, JSON.stringify(current));
    else sessionStorage.removeItem(STORE_KEY);
  }

  function load() {
    try {
      return JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
    } catch (e) {
      return null;
    }
  }

  function showState(name, detail) {
    el.state.dataset.state = name;
    var label = LABELS[name] || name;
    if (name === "resumed") {
      var n = (detail && detail.replayed) || 0;
      el.state.dataset.replayed = String(n);
      label = "resumed, " + n + (n === 1 ? " event" : " events") + " replayed";
    }
    el.state.textContent = label;
  }

  function showNotice(text) {
    el.notice.textContent = text || "";
    el.notice.hidden = !text;
  }

  function render() {
    el.answer.textContent = current ? current.text : "";
    el.generation.textContent = current ? current.id + " · " + current.channel : "";
    showNotice(current ? current.notice : "");
    el.send.disabled = !!(current && current.status === "streaming");
    el.stop.disabled = !(current && current.status === "streaming");
  }

  function finish(status, notice) {
    current.status = status;
    if (notice) current.notice = notice;
    save();
    render();
  }

  function follow() {
    subscription = HubClient.subscribe(current.events_url, {
      // From the very start on the first connection: the worker may have written before the page connected.
      lastEventId: current.lastEventId || "0",
      on: {
        token: function (data) {
          current.text += data && typeof data.text === "string" ? data.text : "";
        },
        reset: function (data) {
          // What was shown may not match the channel any more: drop it, say why, and rebuild from what follows.
          current.text = "";
          current.notice = RESETS[data && data.reason] || "The answer was reset (" + (data && data.reason) + ").";
        },
        done: function (data) {
          var reason = data && data.finish_reason;
          if (reason === "cancelled" || reason === "unwatched" || reason === "length") {
            current.notice = "Finished early: " + reason + ".";
          }
        },
        error: function (data) {
          current.notice = "The generation failed: " + ((data && data.message) || "unknown error") + ".";
        },
      },
      // The text and the id of the last event it includes are saved together, after each event.
      onEvent: function (ev) {
        if (ev.lastEventId) current.lastEventId = ev.lastEventId;
        save();
        render();
      },
      onState: function (name, detail) {
        showState(name, detail);
        if (name === "finished") finish("finished");
        else if (name === "error") finish("error", current.notice || "The stream ended with an error.");
      },
    });
  }

  function stop() {
    if (subscription) subscription.close();
    subscription = null;
  }

  el.provider.addEventListener("change", function () {
    el.model.value = DEFAULT_MODELS[el.provider.value] || "";
  });

  // Cancelling is the worker's to do: it stops the provider and ends the channel with `done` (cancelled), which
  // reaches this page like any other end.
  el.stop.addEventListener("click", function () {
    if (!current) return;
    el.stop.disabled = true;
    fetch("v1/generations/" + encodeURIComponent(current.id), { method: "DELETE", credentials: "same-origin" })
      .catch(function () {
        el.stop.disabled = false;
      });
  });

  el.clear.addEventListener("click", function () {
    stop();
    current = null;
    save();
    render();
    showState("idle");
  });

  el.form.addEventListener("submit", function (e) {
    e.preventDefault();
    stop();
    var body = {
      provider: el.provider.value,
      model: el.model.value,
      messages: [{ role: "user", content: el.prompt.value }],
    };
    showState("connecting");
    el.send.disabled = true;
    fetch("v1/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      credentials: "same-origin",
    }).then(function (resp) {
      return resp.json().then(function (json) {
        if (!resp.ok) throw new Error(json.message || resp.statusText);
        return json;
      });
    }).then(function (job) {
      current = { id: job.id, channel: job.channel, events_url: job.events_url, text: "", lastEventId: null,
        status: "streaming", notice: "" };
      save();
      render();
      follow();
    }).catch(function (err) {
      el.send.disabled = false;
      showState("error");
      showNotice("Could not start the generation: " + err.message);
    });
  });

  // A reload: show what was saved and, unless it was over, resume from the last event it includes.
  current = load();
  render();
  if (current && current.status === "streaming") {
    follow();
  } else if (current) {
    showState(current.status);
  }
})();
