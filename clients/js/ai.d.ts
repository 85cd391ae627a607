// Types for ai.js: the AI SDK's ChatTransport over a HeraldClient.
import type { ChatTransport, UIMessage, UIMessageChunk } from 'ai';
import type { HeraldClient, HeraldEvent } from './herald.js';

export interface HeraldChatTransportOptions {
  /** A HeraldClient; the caller connects and closes it. */
  client: HeraldClient<any>;
  /** An aborted request (useChat's `stop()`) also cancels the run (default false: it only detaches). */
  cancelOnAbort?: boolean;
}

/**
 * `useChat({ transport: new HeraldChatTransport({ client }) })`: a user message
 * goes out as `user_message` (thread = chat id, id = the UI message id); the
 * run that answers it streams back as UI message chunks (reasoning, dynamic
 * tool calls, text, finish / error / abort).
 */
export class HeraldChatTransport<UI_MESSAGE extends UIMessage = UIMessage> implements ChatTransport<UI_MESSAGE> {
  constructor(options: HeraldChatTransportOptions);
  readonly client: HeraldClient<any>;
  /** True: `reconnectToStream` replays the open run from its `agent_started`. */
  readonly resumeStreamIsReplay: true;
  sendMessages: ChatTransport<UI_MESSAGE>['sendMessages'];
  reconnectToStream: ChatTransport<UI_MESSAGE>['reconnectToStream'];
  /** Stop the chat's open run (sends `cancel`); false when none is open. */
  cancel(chatId: string): Promise<boolean>;
}

/** The chunks of one run's events, in order (used by the transport). */
export function runChunker(runId: string): (e: HeraldEvent) => UIMessageChunk[];
