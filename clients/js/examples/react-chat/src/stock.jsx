// The same chat on the AI SDK's own WebSocketChatTransport, pointed at
// Herald's GET /ai: no Herald code in the browser. Herald authenticates the
// socket (the token rides in each frame's headers, fetched fresh from the
// app's backend), keeps the answer resumable across reloads and nodes, and
// stops the agent when useChat's Stop aborts the stream.
import { StrictMode, useEffect, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { useChat } from '@ai-sdk/react';
import { WebSocketChatTransport } from 'ai';
import { Part, history } from './shared.jsx';

const params = new URLSearchParams(location.search);
const user = params.get('user') ?? 'guest';
const chatId = params.get('chat') ?? 'chat-1';
const { aiUrl } = await (await fetch('/config.json')).json();

async function token() {
  const r = await fetch('/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user }) });
  if (!r.ok) throw new Error(`token: HTTP ${r.status}`);
  return (await r.json()).token;
}

// One transport per page, made outside React (StrictMode mounts twice).
// `headers` is resolved for every send and resume frame: each carries a
// fresh token, which also moves the socket's expiry.
const transport = new WebSocketChatTransport({
  url: aiUrl,
  headers: async () => ({ authorization: `Bearer ${await token()}` }),
});

// The app's chat history: a reload mid-answer finds the question stored.
const { stored, useKept } = history(`stock:${user}:${chatId}`);

function Chat() {
  const { messages, sendMessage, status, stop, error, resumeStream } = useChat({ id: chatId, messages: stored, transport, resume: true });
  const [input, setInput] = useState('');
  useKept(messages, status);
  // For the end-to-end test: what useChat holds.
  useEffect(() => { window.__chat = { status, messages }; }, [status, messages]);
  useEffect(() => { window.__resumeStream = resumeStream; }, [resumeStream]);
  const busy = status === 'submitted' || status === 'streaming';
  const submit = (e) => {
    e.preventDefault();
    if (!input.trim() || busy) return;
    sendMessage({ text: input });
    setInput('');
  };
  return (
    <>
      <header>
        <h1>useChat × Herald (stock transport)</h1>
        <span className="conn" id="conn">{user}</span>
      </header>
      <main id="messages" data-status={status}>
        {messages.map((m) => (
          <div key={m.id} className={`msg ${m.role}`} data-id={m.id}>
            {m.parts.map((part, i) => <Part key={i} part={part} />)}
          </div>
        ))}
        {error && <div className="error" role="alert">{error.message}</div>}
      </main>
      <form onSubmit={submit}>
        <input id="text" value={input} onChange={(e) => setInput(e.target.value)} placeholder="Ask the agent…" autoComplete="off" />
        {busy ? <button id="stop" type="button" onClick={() => stop()}>Stop</button> : <button id="send" type="submit">Send</button>}
      </form>
    </>
  );
}

createRoot(document.getElementById('root')).render(<StrictMode><Chat /></StrictMode>);
