// What both pages of the example share, none of it Herald code: how a
// message part is drawn, the chat's view (messages and form), and the app's
// own chat history (in sessionStorage here; a real app keeps it on its server).
import { useEffect, useState } from 'react';

/** One part of a UI message: text, reasoning, or a tool call (static or dynamic). */
export function Part({ part }) {
  if (part.type === 'text') return <div className="text">{part.text}</div>;
  if (part.type === 'reasoning') return <div className="reasoning">{part.text.trimEnd()}</div>;
  if (part.type === 'dynamic-tool' || part.type.startsWith('tool-')) {
    const name = part.toolName ?? part.type.slice('tool-'.length);
    return (
      <div className="tool" data-state={part.state} data-tool-call-id={part.toolCallId}>
        {name}({JSON.stringify(part.input)})
        {part.state === 'output-available' && <> → {part.output?.summary ?? JSON.stringify(part.output)}</>}
        {part.state === 'output-error' && <> failed: {part.errorText}</>}
      </div>
    );
  }
  return null;
}

/**
 * The chat's stored messages, and a hook that keeps them: the user's
 * messages at once, an answer once it is complete. A reload mid-answer
 * therefore finds the question stored, and useChat's `resume` brings the rest.
 */
export function history(key) {
  const stored = JSON.parse(sessionStorage.getItem(key) ?? '[]');
  function useKept(messages, status) {
    useEffect(() => {
      const done = status === 'ready' || status === 'error';
      const last = messages.at(-1);
      const kept = !done && last?.role === 'assistant' ? messages.slice(0, -1) : messages;
      sessionStorage.setItem(key, JSON.stringify(kept));
    }, [messages, status]);
  }
  return { stored, useKept };
}

/**
 * The chat itself: the messages, useChat's error, and the form (Send, or
 * Stop while an answer comes). `chat` is what useChat returned; `onStop`
 * stops the answer; `status` of the header is the page's own.
 */
export function ChatView({ title, status: headerStatus, chat, onStop }) {
  const { messages, sendMessage, status, error } = chat;
  const [input, setInput] = useState('');
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
        <h1>{title}</h1>
        {headerStatus}
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
        {busy ? <button id="stop" type="button" onClick={onStop}>Stop</button> : <button id="send" type="submit">Send</button>}
      </form>
    </>
  );
}
