// What both pages of the example share, none of it Herald code: how a
// message part is drawn, and the app's own chat history (in sessionStorage
// here; a real app keeps it on its server).
import { useEffect } from 'react';

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
