/* hub-client.js: follow one channel of the SSE hub from a browser, resuming exactly where it left off.
 *
 * Copy this file as it is; it needs nothing else. Usage:
 *
 *   const sub = HubClient.subscribe("https://hub.example.com/v1/channels/gen:abc/events", {
 *     lastEventId: sessionStorage.getItem("last-id"),  // resume from here (optional)
 *     on: {
 *       token: (data, ev) => { answer.textContent += data.text; },
 *       reset: (data) => { answer.textContent = ""; },
 *     },
 *     onEvent: (ev) => sessionStorage.setItem("last-id", ev.lastEventId),
 *     onState: (state, detail) => { status.textContent = state; },
 *   });
 *   sub.close();
 *
 * What it adds to a bare EventSource:
 * - Resume on the first connection too: `lastEventId` goes in the `last_event_id` query parameter (an EventSource
 *   cannot set headers); the browser's own reconnects send `Last-Event-ID`, which the hub prefers.
 * - A connection the browser gives up on (an error status, such as a 503 from a node that is shutting down) is
 *   opened again after a growing pause, from the last id received, until the stream finishes or `close()` is called.
 * - Handlers per event type, with the data parsed as JSON when it is JSON.
 * - The terminal events (`done` and `error` by default) close the stream: nothing can follow them, and an open
 *   EventSource would otherwise reconnect for ever. A `reset` whose reason is `deleted` also ends it.
 * - States for the page to show: connecting, streaming, reconnecting, resumed (with the number of events the hub
 *   replayed: those published while the client was away), finished, error.
 *
 * - A live subscription (no `lastEventId`) starts from the channel's current end as a known position, so that a
 *   reconnect made here resumes from it rather than from "now".
 * - A 401 or 403 ends it with the error state (reason `unauthorized`): subscribe again with a fresh token. `url` may
 *   be a function, called for every connection, to put a fresh token in it.
 *
 * List the event type that closes your channel in `terminal` (generations close with `done` or `error`), and give
 * every event type the channel carries a handler: EventSource delivers only the types listened to, and the position
 * kept for a reconnect is the id of the last event delivered.
 *
 * It works behind a load balancer and from another origin: set `withCredentials` when the hub's CORS settings list
 * your origin and the hub authenticates with a cookie.
 */
(function (root) {
  "use strict";

  var DEFAULT_TERMINAL = ["done", "error"];
  var RETRY_MIN_MS = 500;
  var RETRY_MAX_MS = 10000;

  // Stream ids are "<ms>-<seq>"; both parts fit in a double exactly for any real clock and sequence.
  function compareIds(a, b) {
    var pa = String(a).split("-"), pb = String(b).split("-");
    var d = Number(pa[0]) - Number(pb[0]);
    return d !== 0 ? d : Number(pa[1] || 0) - Number(pb[1] || 0);
  }

  function withQuery(url, name, value) {
    var u = new URL(url, root.location ? root.location.href : undefined);
    u.searchParams.set(name, value);
    return u.toString();
  }

  function parse(data) {
    try {
      return JSON.parse(data);
    } catch (e) {
      return data;
    }
  }

  function subscribe(url, options) {
    options = options || {};
    // A function is called for every connection: a URL that carries a token can be given a fresh one.
    var urlOf = typeof url === "function" ? url : function () {
      return url;
    };
    var handlers = options.on || {};
    var terminal = options.terminal || DEFAULT_TERMINAL;
    var onState = options.onState || function () {};
    var onEvent = options.onEvent || function () {};
    var lastId = options.lastEventId || null;
    var source = null;
    var closed = false;
    var finished = false;
    var retryMs = RETRY_MIN_MS;
    var retryTimer = null;
    var opened = false; // whether any connection of this subscription has opened yet
    // Counting what a resume replayed: the channel's last id when the connection opened is the boundary.
    var boundary = null;
    var replayed = 0;
    var early = []; // ids received on this connection before the boundary was known
    var resuming = false;
    var received = false; // any event of the channel arrived
    var liveStart = false; // the first connection is live, from the position the channel had when subscribing
    var types = {};

    function state(name, detail) {
      onState(name, detail || {});
    }

    function infoUrl() {
      // The channel's metadata is at the events URL without its last segment; its other query parameters (a token)
      // are kept.
      var u = new URL(urlOf(), root.location ? root.location.href : undefined);
      u.pathname = u.pathname.replace(/\/events$/, "");
      u.searchParams.delete("last_event_id");
      return u.toString();
    }

    function fetchInfo() {
      var init = options.withCredentials ? { credentials: "include" } : { credentials: "same-origin" };
      return root.fetch(infoUrl(), init);
    }

    function countReplayed(id) {
      if (!resuming || !id) return;
      if (boundary === null) {
        early.push(id);
      } else if (compareIds(id, boundary) <= 0) {
        replayed += 1;
        state("resumed", { replayed: replayed });
      }
    }

    function learnBoundary() {
      fetchInfo().then(function (resp) {
        return resp.ok ? resp.json() : null;
      }).then(function (info) {
        if (!resuming || finished || closed) return;
        boundary = info && info.last_id ? info.last_id : "0-0";
        early.forEach(function (id) {
          if (compareIds(id, boundary) <= 0) replayed += 1;
        });
        early = [];
        state("resumed", { replayed: replayed });
      }).catch(function () {
        // Not knowing how many were replayed changes nothing else.
      });
    }

    function finish(name, detail) {
      finished = true;
      if (source) source.close();
      state(name, detail);
    }

    function dispatch(type, ev) {
      if (closed || finished) return;
      received = true;
      if (ev.lastEventId) lastId = ev.lastEventId;
      countReplayed(ev.lastEventId);
      var data = parse(ev.data);
      var handler = handlers[type];
      if (handler) handler(data, ev);
      onEvent(ev, type, data);
      if (terminal.indexOf(type) >= 0) {
        finish(type === "error" ? "error" : "finished", { event: type, data: data });
      } else if (type === "reset" && data && data.reason === "deleted") {
        finish("error", { event: type, data: data });
      }
    }

    function listen(type) {
      // Unnamed events ("message") come through onmessage, once.
      if (types[type] || type === "message") return;
      types[type] = true;
      source.addEventListener(type, function (ev) {
        // EventSource reports its own connection failures as an `error` event too, a plain Event without data:
        // only a MessageEvent is an event of the stream (such as the hub's terminal `error`).
        if (typeof root.MessageEvent === "function" && !(ev instanceof root.MessageEvent)) return;
        dispatch(type, ev);
      });
    }

    function retry() {
      retryTimer = root.setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
    }

    // Ask the channel whether there is anything left to wait for before opening another connection.
    function giveUpOrRetry() {
      fetchInfo().then(function (resp) {
        if (resp.status === 404) return { gone: true };
        if (resp.status === 401 || resp.status === 403) return { denied: resp.status };
        return resp.ok ? resp.json() : null;
      }).then(function (info) {
        if (closed || finished) return;
        if (info && info.denied) {
          // Retrying cannot help (an expired or refused token): the page subscribes again with a new one.
          finish("error", { reason: "unauthorized", status: info.denied });
        } else if (info && info.gone && received) {
          // It held what we received and is gone (deleted, or expired): nothing more will come. A channel never
          // seen may just not exist yet (a generation not yet started): that one is waited for.
          finish("error", { reason: "channel_not_found" });
        } else if (info && info.closed && lastId && compareIds(lastId, info.last_id) >= 0) {
          finish("finished", {}); // everything, the end included, was already received
        } else {
          retry();
        }
      }).catch(function () {
        if (!closed && !finished) retry();
      });
    }

    function connect() {
      retryTimer = null;
      if (closed || finished) return;
      var target = lastId ? withQuery(urlOf(), "last_event_id", lastId) : urlOf();
      source = new root.EventSource(target, { withCredentials: !!options.withCredentials });
      types = {};
      Object.keys(handlers).concat(terminal, ["reset"]).forEach(listen);
      source.onmessage = function (ev) {
        dispatch("message", ev);
      };
      source.onopen = function () {
        retryMs = RETRY_MIN_MS;
        // A first connection without a position (live) or from the start ("0") is no resume; any other one resumes
        // from an id and replays what was published since (possibly nothing).
        resuming = opened || (!liveStart && !!lastId && lastId !== "0" && lastId !== "0-0");
        opened = true;
        boundary = null;
        replayed = 0;
        early = [];
        if (resuming) {
          state("resumed", { replayed: 0 });
          learnBoundary();
        } else {
          state("streaming");
        }
      };
      source.onerror = function (ev) {
        // A stream event named `error` also reaches onerror: that one is the stream's, handled by its listener.
        if (typeof root.MessageEvent === "function" && ev instanceof root.MessageEvent) return;
        if (closed || finished) return;
        if (source.readyState === root.EventSource.CONNECTING) {
          // The browser reconnects by itself, with Last-Event-ID.
          state("reconnecting");
          return;
        }
        // The browser gave up: an error status (a node shutting down, a proxy), or a 204 because the stream is over.
        source.close();
        state("reconnecting", { retryMs: retryMs });
        giveUpOrRetry();
      };
    }

    state("connecting");
    if (lastId) {
      connect();
    } else {
      // Live: start from the channel's current end, as a known position. The hub also announces it (an `id:` line
      // that EventSource keeps to itself), but if the browser gives up on the connection, a reconnect made here
      // without it would start from "now" again and skip what came in between.
      liveStart = true;
      fetchInfo().then(function (resp) {
        if (resp.status === 404) return { last_id: "0" }; // nothing yet: everything that comes is new
        return resp.ok ? resp.json() : null;
      }).then(function (info) {
        if (info && info.last_id) lastId = info.last_id;
      }).catch(function () {
        // Without the position (no access to the channel's metadata) it starts live, as a bare EventSource does.
      }).then(connect);
    }

    return {
      close: function () {
        closed = true;
        if (retryTimer !== null) root.clearTimeout(retryTimer);
        if (source) source.close();
      },
      get lastEventId() {
        return lastId;
      },
      get finished() {
        return finished;
      },
    };
  }

  root.HubClient = { subscribe: subscribe, compareIds: compareIds };
})(typeof window !== "undefined" ? window : this);
