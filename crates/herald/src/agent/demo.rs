//! The built-in demo agent, used when no webhook is configured: it answers
//! every message with the golden path — `agent_started`, `agent_thinking` (a
//! few streamed chunks), `tool_executing` / `tool_completed` for a pretend
//! tool, the answer streamed word by word as `agent_text_delta` (part
//! `answer`), `agent_completed` with the same text as `final_response` — over
//! about a second and a half, through the same publish path external
//! backends use. A `cancel` ends the run with `agent_cancelled`, and nothing
//! of that run follows it. An AI SDK chat turn (`chat_request`) is answered
//! the same way, in the run Herald opened for it, about its last user message.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{AgentBackend, BackendRequest, DeliveryError, MessageOut};
use crate::BoxFuture;
use crate::broker::{Broker, FleetRequest, NewEvent, user_stream};
use crate::hub::LocalRuns;
use crate::tasks::Tasks;

/// Pause between the demo agent's events.
const STEP: Duration = Duration::from_millis(160);
/// Pause between the words of its answer.
const WORD: Duration = Duration::from_millis(30);

/// One thing the demo agent publishes, and the pause before it.
enum Step {
    Event(&'static str, Value),
    Word(usize, String),
}

/// The demo agent.
#[derive(Debug)]
pub struct DemoAgent {
    broker: Arc<dyn Broker>,
    tasks: Tasks,
    /// Open runs: run id → (its stream, cancel signal).
    runs: DashMap<String, (String, Arc<Notify>)>,
}

impl DemoAgent {
    /// A demo agent publishing through `broker`, running as tracked `tasks`.
    pub(crate) fn new(broker: Arc<dyn Broker>, tasks: Tasks) -> Arc<Self> {
        Arc::new(Self {
            broker,
            tasks,
            runs: DashMap::new(),
        })
    }

    async fn run(self: Arc<Self>, msg: MessageOut, run_id: String, cancel: Arc<Notify>) {
        let words: Vec<&str> = msg.text.split_whitespace().collect();
        let topic = if words.is_empty() {
            "your message".to_owned()
        } else {
            words.iter().take(6).copied().collect::<Vec<_>>().join(" ")
        };
        // Pairs the tool call's two events (`tool_call_id`, see docs/PROTOCOL.md).
        let call_id = format!("call_{}", run_id.trim_start_matches("run_"));
        let answer = format!(
            "You said: \u{201c}{}\u{201d}. I am Herald's built-in demo agent; set HERALD_WEBHOOK_URL to connect your own.",
            msg.text
        );
        let mut steps = vec![
            Step::Event(
                "agent_started",
                json!({"message_id": msg.message_id, "agent": "herald-demo"}),
            ),
            Step::Event("agent_thinking", json!({"text": "Reading your message"})),
            Step::Event(
                "agent_thinking",
                json!({"text": format!("Thinking about \u{201c}{topic}\u{201d}")}),
            ),
            Step::Event(
                "tool_executing",
                json!({"tool": "search", "tool_call_id": call_id, "input": {"query": topic}}),
            ),
            Step::Event(
                "tool_completed",
                json!({"tool": "search", "tool_call_id": call_id, "output": {"results": 3, "summary": format!("3 notes found about \u{201c}{topic}\u{201d}")}}),
            ),
            Step::Event("agent_thinking", json!({"text": "Writing the answer"})),
        ];
        // The answer word by word, each word with the space after it.
        steps.extend(
            answer
                .split_inclusive(' ')
                .enumerate()
                .map(|(i, w)| Step::Word(i, w.to_owned())),
        );
        steps.push(Step::Event(
            "agent_completed",
            json!({ "final_response": answer }),
        ));
        for (i, step) in steps.into_iter().enumerate() {
            if i > 0 {
                let pause = if matches!(step, Step::Word(..)) {
                    WORD
                } else {
                    STEP
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = cancel.notified() => {
                        self.publish(&msg, &run_id, "agent_cancelled", json!({"reason": "cancelled by user"})).await;
                        break;
                    }
                }
            }
            match step {
                Step::Event(event, data) => self.publish(&msg, &run_id, event, data).await,
                Step::Word(index, word) => {
                    let delta = NewEvent::text_delta(
                        run_id.clone(),
                        Some(msg.thread_id.clone()),
                        "answer".to_owned(),
                        &word,
                        Some(index as u64),
                        crate::clock::now_rfc3339(),
                    );
                    self.send(&msg, delta).await;
                }
            }
        }
        self.runs.remove(&run_id);
    }

    async fn publish(&self, msg: &MessageOut, run_id: &str, event: &str, data: Value) {
        let event = NewEvent::new(
            event.to_owned(),
            Some(msg.thread_id.clone()),
            Some(run_id.to_owned()),
            data,
            crate::clock::now_rfc3339(),
        );
        self.send(msg, event).await;
    }

    async fn send(&self, msg: &MessageOut, event: NewEvent) {
        // A message written to a shared stream is answered there.
        let stream = stream_of(msg.stream.as_deref(), &msg.user_id);
        let event = event.in_stream(Some(&stream));
        if let Err(e) = self.broker.publish(&stream, vec![event]).await {
            tracing::warn!(error = %e, "demo agent could not publish");
        }
    }
}

/// The stream a request is about: its shared stream, else its user's own.
fn stream_of(shared: Option<&str>, user: &str) -> String {
    shared.map_or_else(|| user_stream(user), str::to_owned)
}

impl LocalRuns for DemoAgent {
    fn cancel(&self, stream: &str, run_id: &str) -> bool {
        match self.runs.get(run_id) {
            Some(run) if run.0 == stream => {
                // notify_one stores a permit, so a cancel between steps is not lost.
                run.1.notify_one();
                true
            }
            _ => false,
        }
    }
}

impl AgentBackend for Arc<DemoAgent> {
    fn deliver<'a>(&'a self, req: &'a BackendRequest) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            if let BackendRequest::Cancel(c) = req
                && !self.cancel(&stream_of(c.stream.as_deref(), &c.user_id), &c.run_id)
            {
                // The run may be executing on another node.
                let ask = FleetRequest::CancelRun {
                    user: c.user_id.clone(),
                    run_id: c.run_id.clone(),
                    stream: c.stream.clone(),
                };
                if let Err(e) = self.broker.ask_fleet(ask).await {
                    return Err(DeliveryError::Unavailable {
                        detail: e.to_string(),
                    });
                }
            }
            Ok(())
        })
    }

    fn after_ack(&self, req: BackendRequest) {
        let (msg, run_id) = match req {
            BackendRequest::UserMessage(msg) => {
                let run_id = format!("run_{:012x}", rand::random::<u64>() >> 16);
                (msg, run_id)
            }
            // An AI SDK chat turn: Herald opened the run; the demo answers
            // the last user message in it.
            BackendRequest::ChatRequest(chat) => {
                let text = chat.last_user_text();
                let msg = MessageOut {
                    stream: None,
                    user_id: chat.user_id,
                    thread_id: chat.chat_id,
                    message_id: chat.run_id.clone(),
                    text,
                    data: serde_json::Map::new(),
                    conn_id: chat.conn_id,
                    received_at: chat.received_at,
                };
                (msg, chat.run_id)
            }
            BackendRequest::Cancel(_) | BackendRequest::SubscribeRequest(_) => return,
        };
        let cancel = Arc::new(Notify::new());
        let stream = stream_of(msg.stream.as_deref(), &msg.user_id);
        self.runs.insert(run_id.clone(), (stream, cancel.clone()));
        self.tasks.spawn(self.clone().run(msg, run_id, cancel));
    }
}
