// A chat page on the Vercel AI SDK's useChat, with Herald as its transport:
// the user's message goes to the agent through Herald, the agent's run comes
// back over the same WebSocket as reasoning, tool calls and the answer. A
// reload mid-run picks the run up again (useChat's `resume`), Stop cancels it.
import { StrictMode, useEffect, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { useChat } from '@ai-sdk/react';
import { HeraldClient } from 'herald-gateway';
import { HeraldChatTransport } from 'herald-gateway/ai';
import { ChatView, history } from './shared.jsx';

const params = new URLSearchParams(location.search);
const user = params.get('user') ?? 'guest';
const chatId = params.get('chat') ?? 'chat-1';
const { heraldUrl } = await (await fetch('/config.json')).json();

// One client and one transport per page, made outside React: StrictMode's
// double mount cannot open a second socket.
const client = new HeraldClient({
  url: heraldUrl,
  // Tokens come from the app's own backend; the client refreshes them
  // before they expire. null (signed out) stops the client.
  getToken: async () => {
    const r = await fetch('/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user }) });
    if (r.status === 400 || r.status === 401 || r.status === 403) return null;
    if (!r.ok) throw new Error(`token: HTTP ${r.status}`);
    return (await r.json()).token;
  },
  // The resume position survives a reload, so the page gets only what it
  // missed, plus the open run from its start.
  storageKey: `herald:${user}`,
});
// useChat's stop() only detaches the stream; the Stop button below also
// asks the agent to stop the run (transport.cancel).
const transport = new HeraldChatTransport({ client });
client.connect();
window.__herald = { client, transport }; // for the end-to-end test

// The app's chat history: a reload mid-answer finds the question stored.
const { stored, useKept } = history(`chat:${user}:${chatId}`);

function useConnectionState() {
  const [state, setState] = useState(client.state);
  useEffect(() => client.on('state', setState), []);
  return state;
}

function Chat() {
  const chat = useChat({
    id: chatId,
    messages: stored,
    transport,
    resume: true, // after a reload, ask the transport for the chat's open run
  });
  const connection = useConnectionState();
  useKept(chat.messages, chat.status);
  // For the end-to-end test: what useChat holds.
  useEffect(() => { window.__chat = { status: chat.status, messages: chat.messages, connection }; }, [chat.status, chat.messages, connection]);
  const badge = <span className="conn" id="conn" data-state={connection}>{user} · {connection}</span>;
  // useChat's stop() only detaches the stream: the agent is asked to stop too.
  return <ChatView title="Herald × useChat" status={badge} chat={chat} onStop={() => { transport.cancel(chatId); chat.stop(); }} />;
}

createRoot(document.getElementById('root')).render(<StrictMode><Chat /></StrictMode>);
