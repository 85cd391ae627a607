// The same chat on the AI SDK's own WebSocketChatTransport, pointed at
// Herald's GET /ai: no Herald code in the browser. Herald authenticates the
// socket (the token rides in each frame's headers, fetched fresh from the
// app's backend), keeps the answer resumable across reloads and nodes, and
// stops the agent when useChat's Stop aborts the stream.
import { StrictMode, useEffect } from 'react';
import { createRoot } from 'react-dom/client';
import { useChat } from '@ai-sdk/react';
import { WebSocketChatTransport } from 'ai';
import { ChatView, history } from './shared.jsx';

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
  const chat = useChat({ id: chatId, messages: stored, transport, resume: true });
  useKept(chat.messages, chat.status);
  // For the end-to-end test: what useChat holds, and its resumeStream.
  useEffect(() => { window.__chat = { status: chat.status, messages: chat.messages }; }, [chat.status, chat.messages]);
  useEffect(() => { window.__resumeStream = chat.resumeStream; }, [chat.resumeStream]);
  const badge = <span className="conn" id="conn">{user}</span>;
  // Stop aborts the stream; Herald stops the agent.
  return <ChatView title="useChat × Herald (stock transport)" status={badge} chat={chat} onStop={() => chat.stop()} />;
}

createRoot(document.getElementById('root')).render(<StrictMode><Chat /></StrictMode>);
