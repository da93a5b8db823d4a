/* The demo page: submit a generation, follow its channel with HubClient, and survive reloads.
 *
 * The page keeps the generation it follows in sessionStorage: its events URL, the text, reasoning and tool calls so
 * far and the id of the last event they include, written together after every event. A reload resumes from that id,
 * so the rebuilt answer is the same, with no token lost or doubled.
 *
 * With the weather tool, the page is an agent loop: the request carries one tool; when the answer ends with tool
 * calls (`done.finish_reason` "tool_calls"), the page runs them, and asks again with the conversation, `done.message`
 * verbatim and the tools' results. Earlier turns stay in the transcript (`history`); the loop state (`agent`) is saved
 * with the rest, so a reload carries on with it.
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

  var MAX_TURNS = 5; // an agent loop whose model keeps calling tools is stopped after this many answers
  var WEATHER_PROMPT = "What is the weather in Paris?";
  var WEATHER_TOOL = {
    type: "function",
    function: {
      name: "get_weather",
      description: "The current weather in a city",
      parameters: {
        type: "object",
        properties: { city: { type: "string", description: "The city, e.g. Paris" } },
        required: ["city"],
      },
    },
  };

  var el = {
    form: document.getElementById("ask"),
    prompt: document.getElementById("prompt"),
    provider: document.getElementById("provider"),
    model: document.getElementById("model"),
    effort: document.getElementById("effort"),
    weather: document.getElementById("weather"),
    send: document.getElementById("send"),
    stop: document.getElementById("stop"),
    clear: document.getElementById("clear"),
    state: document.getElementById("state"),
    generation: document.getElementById("generation"),
    notice: document.getElementById("notice"),
    answer: document.getElementById("answer"),
  };

  // {id, channel, events_url, text, reasoning, refusal, calls, finishReason, message, lastEventId, status, notice,
  //  agent: {provider, model, messages, tools, effort, turn} or null, history: [transcript items of earlier turns]}
  var current = null;
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

  // The transcript's items, in order: earlier turns, then this answer's reasoning, text, refusal and tool calls.
  function turnItems(gen) {
    var items = [];
    if (gen.reasoning) items.push({ kind: "reasoning", text: gen.reasoning });
    if (gen.text) items.push({ kind: "text", text: gen.text });
    if (gen.refusal) items.push({ kind: "refusal", text: gen.refusal });
    (gen.calls || []).forEach(function (call) {
      items.push({ kind: "call", name: call.name, text: call.arguments, complete: call.complete });
    });
    return items;
  }

  function span(className, text) {
    var node = document.createElement("span");
    node.className = className;
    node.textContent = text;
    return node;
  }

  // One item of the transcript. A plain answer is one text block, so the answer box holds exactly its text.
  function itemNode(item) {
    var node = document.createElement("div");
    node.className = item.kind;
    if (item.kind === "call" || item.kind === "result") {
      node.className = item.kind === "call" ? "tool-call" : "tool-result";
      if (item.kind === "call") node.dataset.complete = String(!!item.complete);
      node.append(span("tag", item.kind === "call" ? "tool call" : "tool result"), span("name", item.name),
        span("args", item.text));
    } else {
      node.textContent = item.text;
    }
    return node;
  }

  function render() {
    var items = current ? (current.history || []).concat(turnItems(current)) : [];
    el.answer.replaceChildren.apply(el.answer, items.map(itemNode));
    el.generation.textContent = current ? current.id + " · " + current.channel : "";
    showNotice(current ? current.notice : "");
    var busy = !!(current && (current.status === "streaming" || current.status === "tools"));
    el.send.disabled = busy;
    el.stop.disabled = !(current && current.status === "streaming");
  }

  // The tool call at `index` of the answer, made when its first fragment arrives.
  function callAt(index) {
    var calls = current.calls || (current.calls = []);
    for (var i = 0; i < calls.length; i++) {
      if (calls[i].index === index) return calls[i];
    }
    var call = { index: index, id: "", name: "", arguments: "", complete: false };
    calls.push(call);
    return call;
  }

  function textOf(data) {
    return data && typeof data.text === "string" ? data.text : "";
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
          current.text += textOf(data);
        },
        reasoning: function (data) {
          current.reasoning = (current.reasoning || "") + textOf(data);
        },
        refusal: function (data) {
          current.refusal = (current.refusal || "") + textOf(data);
        },
        tool_call_delta: function (data) {
          var call = callAt(data.index);
          if (data.id) call.id = data.id;
          if (data.name) call.name = data.name;
          call.arguments += data.arguments || "";
        },
        tool_call: function (data) {
          var call = callAt(data.index);
          call.id = data.id;
          call.name = data.name;
          call.arguments = data.arguments;
          call.complete = true;
        },
        reset: function (data) {
          // What was shown may not match the channel any more: drop it, say why, and rebuild from what follows.
          current.text = "";
          current.reasoning = "";
          current.refusal = "";
          current.calls = [];
          current.notice = RESETS[data && data.reason] || "The answer was reset (" + (data && data.reason) + ").";
        },
        done: function (data) {
          var reason = data && data.finish_reason;
          current.finishReason = reason;
          current.message = data && data.message;
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
        if (name === "finished") {
          finish("finished");
          if (wantsTools()) runTools();
        }
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

  // Whether the answer just finished asks the page's agent loop to run tools.
  function wantsTools() {
    return !!(current && current.agent && current.status === "finished" && current.finishReason === "tool_calls" &&
      current.message && current.message.tool_calls);
  }

  // The page's one tool: a fixed forecast for the city asked for.
  function runTool(name, args) {
    if (name !== "get_weather") return { error: "no tool named " + name };
    var city = "Paris";
    try {
      city = JSON.parse(args).city || city;
    } catch (e) {
      // Arguments that are not JSON get the default city: the model is told what was looked up.
    }
    return { city: city, temp_c: 21, sky: "sunny" };
  }

  // Run the answer's tool calls here and ask again: the conversation, the answer verbatim, and each call's result.
  function runTools() {
    var agent = current.agent;
    var calls = current.message.tool_calls;
    var results = calls.map(function (call) {
      var result = runTool(call["function"].name, call["function"].arguments);
      return { role: "tool", tool_call_id: call.id, content: JSON.stringify(result) };
    });
    var history = (current.history || []).concat(turnItems(current), results.map(function (result, i) {
      return { kind: "result", name: calls[i]["function"].name, text: result.content };
    }));
    if (agent.turn >= MAX_TURNS) {
      current.notice = "Stopped the agent loop after " + MAX_TURNS + " answers that called tools.";
      save();
      render();
      return;
    }
    current.status = "tools";
    save();
    render();
    generate({
      provider: agent.provider,
      model: agent.model,
      messages: agent.messages.concat([current.message], results),
      tools: agent.tools,
      effort: agent.effort,
      turn: agent.turn + 1,
    }, history);
  }

  // Start a generation and follow it. `agent`: the request; with tools, the loop state kept for the next turn.
  function generate(agent, history) {
    var body = { provider: agent.provider, model: agent.model, messages: agent.messages };
    if (agent.tools) body.tools = agent.tools;
    if (agent.effort) body.reasoning_effort = agent.effort;
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
      current = { id: job.id, channel: job.channel, events_url: job.events_url, text: "", reasoning: "", refusal: "",
        calls: [], lastEventId: null, status: "streaming", notice: "", agent: agent.tools ? agent : null,
        history: history };
      save();
      render();
      follow();
    }).catch(function (err) {
      var notice = "Could not start the generation: " + err.message;
      if (current && current.status === "tools") finish("error", notice); // a later answer of the agent loop
      el.send.disabled = false;
      showState("error");
      showNotice(notice);
    });
  }

  // The weather tool wants a weather question: the default prompt is swapped for one, and back.
  el.weather.addEventListener("change", function () {
    var from = el.weather.checked ? el.prompt.defaultValue : WEATHER_PROMPT;
    if (el.prompt.value === from) el.prompt.value = el.weather.checked ? WEATHER_PROMPT : el.prompt.defaultValue;
  });

  el.form.addEventListener("submit", function (e) {
    e.preventDefault();
    stop();
    generate({
      provider: el.provider.value,
      model: el.model.value,
      messages: [{ role: "user", content: el.prompt.value }],
      tools: el.weather.checked ? [WEATHER_TOOL] : null,
      effort: el.effort.value || null,
      turn: 1,
    }, []);
  });

  // A reload: show what was saved and, unless it was over, resume from the last event it includes.
  current = load();
  render();
  if (current && current.status === "streaming") {
    follow();
  } else if (current && current.status === "tools") {
    // Reloaded between two answers of the agent loop: carry on. (Had the next request already gone out, it goes out
    // again; the first copy's answer is not shown.)
    current.status = "finished";
    runTools();
  } else if (current) {
    showState(current.status);
  }
})();
