// The Vercel AI SDK's own client against a hub: `node ai_sdk_client.mjs <hub url> <scenario> <chat id> [model]`.
// Prints one JSON line of what the SDK assembled (the last line of stdout: the SDK may warn before it); tests/producer/test_ai_sdk.py runs it and checks it against the
// generation. Nothing here parses the stream itself: DefaultChatTransport and readUIMessageStream do.
import { WorkflowChatTransport } from "@ai-sdk/workflow/client";
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [, , base, scenario, chatId, model = "demo:40"] = process.argv;
const WEATHER = {
  type: "function",
  function: {
    name: "get_weather",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};
const body = scenario === "tools" ? { provider: "demo", model, tools: [WEATHER] } : { provider: "demo", model };
const transport = new DefaultChatTransport({ api: `${base}/v1/ai-sdk/chat`, body });
const question = [{ id: "u1", role: "user", parts: [{ type: "text", text: "What is the weather in Paris?" }] }];

// The last snapshot readUIMessageStream gives of the assistant message, with every chunk seen on the way.
async function assemble(stream, { abortAfter, onChunk } = {}) {
  const chunks = [];
  const seen = stream.pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        chunks.push(chunk.type);
        onChunk?.(chunk, chunks.length);
        controller.enqueue(chunk);
      },
    }),
  );
  let message;
  try {
    for await (const snapshot of readUIMessageStream({ stream: seen })) {
      message = snapshot;
      if (abortAfter !== undefined && chunks.length >= abortAfter) break;
    }
  } catch (error) {
    if (error.name !== "AbortError") throw error;
  }
  return { message, chunks };
}

function summary({ message, chunks }) {
  const parts = message?.parts ?? [];
  return {
    id: message?.id,
    text: parts.filter((p) => p.type === "text").map((p) => p.text).join(""),
    tools: parts.filter((p) => p.type.startsWith("tool-")).map((p) => ({ type: p.type, state: p.state, input: p.input })),
    chunks,
  };
}

async function send(extra = {}) {
  return transport.sendMessages({ chatId, messages: question, trigger: "submit-message", ...extra });
}

const out = {};
if (scenario === "send" || scenario === "tools") {
  Object.assign(out, summary(await assemble(await send())));
} else if (scenario === "resume") {
  // The connection is cut after a few chunks; reconnectToStream (what useChat({resume: true}) calls) resumes.
  const cut = new AbortController();
  const first = await assemble(await send({ abortSignal: cut.signal }), {
    onChunk: (_chunk, n) => n === 6 && cut.abort(),
  });
  out.before = first.chunks.length;
  Object.assign(out, summary(await assemble(await transport.reconnectToStream({ chatId }))));
  out.after = await transport.reconnectToStream({ chatId }); // over: 204, so null
} else if (scenario === "twice") {
  // Two resumes at once (React StrictMode mounts twice): each gets the message once.
  const stream = await send();
  const [a, b] = await Promise.all([
    transport.reconnectToStream({ chatId }).then((s) => assemble(s)),
    transport.reconnectToStream({ chatId }).then((s) => assemble(s)),
  ]);
  await assemble(stream);
  out.texts = [summary(a).text, summary(b).text];
} else if (scenario === "stop") {
  const { message, chunks } = await assemble(await send(), {
    onChunk: (_chunk, n) => {
      if (n === 5) fetch(`${base}/v1/ai-sdk/chat/${chatId}/stop`, { method: "POST" });
    },
  });
  Object.assign(out, summary({ message, chunks }));
} else if (scenario === "workflow") {
  // WorkflowChatTransport, as it comes: no chat id (the hub makes the run), and its POST stream cut after six
  // chunks (a proxy's timeout): it reconnects with ?startIndex=6 and gets the rest, each chunk once.
  let runId;
  const cutting = async (url, init) => {
    const response = await fetch(url, init);
    if (init?.method !== "POST") return response;
    runId = response.headers.get("x-workflow-run-id");
    const reader = response.body.getReader();
    let chunks = 0;
    const body = new ReadableStream({
      async pull(controller) {
        const { done, value } = await reader.read();
        if (done || chunks >= 6) {
          controller.close();
          if (!done) await reader.cancel();
          return;
        }
        chunks += new TextDecoder().decode(value).split("data: ").length - 1;
        controller.enqueue(value);
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
  const workflow = new WorkflowChatTransport({ api: `${base}/v1/ai-sdk/chat`, fetch: cutting });
  const whole = await assemble(await workflow.sendMessages({ chatId, messages: question, body }));
  Object.assign(out, summary(whole), { runId });
  // Then from the tail, as a page that comes back late asks: the last three chunks.
  const late = new WorkflowChatTransport({ api: `${base}/v1/ai-sdk/chat`, initialStartIndex: -3 });
  out.tail = (await assemble(await late.reconnectToStream({ chatId: runId }))).chunks;
} else if (scenario === "idle") {
  out.stream = await transport.reconnectToStream({ chatId });
} else {
  throw new Error(`unknown scenario ${scenario}`);
}
console.log(JSON.stringify(out));
