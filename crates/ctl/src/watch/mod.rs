//! `p2pctl watch`: a live terminal dashboard over the supervisor's control
//! socket (ratatui + crossterm). It redraws when something happens — a
//! supervisor event, a key, an answer, a resize — and once a second for the
//! uptimes; it never waits on the supervisor in its own loop, so it stays
//! responsive during a failover. The terminal is restored on every way out
//! (quit, error, panic, the cluster stopping).

pub mod model;
pub mod ui;

use std::io::Stdout;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use crossterm::{cursor, execute};
use futures_util::StreamExt;
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::Cluster;
use crate::control::{self, Request};
use crate::supervisor::CtlEvent;
use model::{Model, Prompt};

/// Who owns the cluster the dashboard shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// `p2pctl watch`: quitting leaves the cluster running.
    Attached,
    /// `p2pctl up` on a terminal: quitting stops the cluster, as Ctrl-C
    /// does.
    Foreground,
}

/// An answer from the supervisor, back in the loop.
enum Answer {
    Ps(Value),
    Plugins(Value),
    /// The result of a user action, as a status line.
    Done(String),
}

/// Puts the terminal back the way it was, however the dashboard ends.
struct TermGuard;

impl TermGuard {
    fn enter() -> anyhow::Result<TermGuard> {
        enable_raw_mode().context("cannot put the terminal in raw mode (is this a terminal?)")?;
        let guard = TermGuard;
        execute!(std::io::stdout(), EnterAlternateScreen, cursor::Hide)?;
        // A panic would otherwise leave the terminal raw and hidden.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        Ok(guard)
    }
}

fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
}

impl Drop for TermGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Runs the dashboard until the user quits or the cluster stops.
///
/// # Errors
/// If no cluster runs, or the terminal cannot be set up.
pub async fn watch(cluster: &Cluster, owner: Owner) -> anyhow::Result<i32> {
    let mut events = control::subscribe(&cluster.state_dir, &cluster.name).await?;

    let mut model = Model::new(&cluster.name);
    let (tx, mut answers) = mpsc::channel::<Answer>(64);
    refresh(cluster, &tx, true);

    let guard = TermGuard::enter()?;
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    terminal.clear()?;
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut refreshing = true;
    let mut stopped = false;
    while !model.quit {
        draw(&mut terminal, &model)?;
        tokio::select! {
            line = events.next_line() => match line {
                Ok(Some(line)) => {
                    if let Ok(ev) = serde_json::from_str::<CtlEvent>(&line) {
                        if model.apply_event(&ev, Instant::now()) && !refreshing {
                            refreshing = true;
                            refresh(cluster, &tx, true);
                        }
                    }
                }
                _ => {
                    stopped = true;
                    break;
                }
            },
            key = keys.next() => match key {
                Some(Ok(Event::Key(k))) if k.kind != KeyEventKind::Release => on_key(&mut model, k, cluster, &tx),
                Some(Ok(_)) => {} // a resize: the next draw fits the new size
                Some(Err(_)) | None => break,
            },
            _ = tick.tick() => {
                if !refreshing {
                    refreshing = true;
                    refresh(cluster, &tx, false);
                }
            }
            Some(answer) = answers.recv() => match answer {
                Answer::Ps(rows) => {
                    model.apply_ps(&rows);
                    refreshing = false;
                }
                Answer::Plugins(data) => model.apply_plugins(&data),
                Answer::Done(status) => model.status = status,
            },
        }
    }
    drop(terminal);
    drop(guard);
    if stopped {
        crate::run::say(&format!("cluster {} stopped", cluster.name));
        return Ok(0);
    }
    if owner == Owner::Foreground {
        let _ = control::call(&cluster.state_dir, &cluster.name, &Request::Down).await;
    } else {
        crate::run::say(&format!(
            "left the dashboard; cluster {} keeps running (p2pctl down stops it)",
            cluster.name
        ));
    }
    Ok(0)
}

fn draw(terminal: &mut Terminal<CrosstermBackend<Stdout>>, model: &Model) -> anyhow::Result<()> {
    terminal.draw(|f| ui::draw(f, model))?;
    Ok(())
}

/// Asks for the process table (and, with `bots`, the plugin table) in the
/// background; the answers come back through `tx`.
fn refresh(cluster: &Cluster, tx: &mpsc::Sender<Answer>, bots: bool) {
    let (dir, name, tx) = (cluster.state_dir.clone(), cluster.name.clone(), tx.clone());
    tokio::spawn(async move {
        if bots {
            if let Ok(r) = control::call(&dir, &name, &Request::Plugins).await {
                if let (true, Some(data)) = (r.ok, r.data) {
                    let _ = tx.send(Answer::Plugins(data)).await;
                }
            }
        }
        let rows = match control::call(&dir, &name, &Request::Ps).await {
            Ok(r) => r.data.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        let _ = tx.send(Answer::Ps(rows)).await;
    });
}

/// Sends one request in the background and reports its outcome as a
/// status line.
fn act(cluster: &Cluster, tx: &mpsc::Sender<Answer>, what: String, req: Request) {
    let (dir, name, tx) = (cluster.state_dir.clone(), cluster.name.clone(), tx.clone());
    tokio::spawn(async move {
        let status = match control::call(&dir, &name, &req).await {
            Ok(r) if r.ok => outcome(&what, &req, r.data.unwrap_or(Value::Null)),
            Ok(r) => format!("{what}: {}", r.error.unwrap_or_else(|| "refused".into())),
            Err(e) => format!("{what}: {e}"),
        };
        let _ = tx.send(Answer::Done(status)).await;
    });
}

fn outcome(what: &str, req: &Request, data: Value) -> String {
    match req {
        Request::Check if data["agree"] == true => format!(
            "check: all {} agree on {} (up to seq {})",
            crate::display::count(
                &data["nodes"].as_array().map_or(0, Vec::len).into(),
                "node",
                "nodes"
            ),
            crate::display::count(&data["messages"], "message", "messages"),
            data["last_seq"]
        ),
        Request::Check => format!("check: DISAGREE: {}", data["difference"].as_str().unwrap_or("?")),
        _ => format!("{what}: done"),
    }
}

fn on_key(m: &mut Model, k: KeyEvent, cluster: &Cluster, tx: &mpsc::Sender<Answer>) {
    if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
        m.quit = true;
        return;
    }
    if let Some((prompt, mut text)) = m.prompt.take() {
        match k.code {
            KeyCode::Esc => m.status = "cancelled".into(),
            KeyCode::Enter => submit(m, prompt, text.trim(), cluster, tx),
            KeyCode::Backspace => {
                text.pop();
                m.prompt = Some((prompt, text));
            }
            KeyCode::Char(c) if text.len() < p2p_proto::limits::MAX_TEXT_LEN => {
                text.push(c);
                m.prompt = Some((prompt, text));
            }
            _ => m.prompt = Some((prompt, text)),
        }
        return;
    }
    let selected = m.selected_node().map(str::to_string);
    let signal = |node: Option<String>, sig: &str| Request::Kill {
        node,
        coordinator: false,
        signal: sig.into(),
    };
    match (k.code, selected) {
        (KeyCode::Char('q') | KeyCode::Esc, _) => m.quit = true,
        (KeyCode::Up | KeyCode::Char('k'), _) => m.select(-1),
        (KeyCode::Down | KeyCode::Char('j'), _) => m.select(1),
        (KeyCode::Char('c'), _) => {
            m.status = "killing the coordinator (SIGKILL)…".into();
            let req = Request::Kill {
                node: None,
                coordinator: true,
                signal: "KILL".into(),
            };
            act(cluster, tx, "kill the coordinator".into(), req);
        }
        (KeyCode::Char('x'), Some(n)) => act(cluster, tx, format!("kill {n}"), signal(Some(n), "KILL")),
        (KeyCode::Char('s'), Some(n)) => act(cluster, tx, format!("stop {n}"), signal(Some(n), "STOP")),
        (KeyCode::Char('o'), Some(n)) => act(cluster, tx, format!("continue {n}"), signal(Some(n), "CONT")),
        (KeyCode::Char('r'), Some(n)) => {
            act(cluster, tx, format!("restart {n}"), Request::Restart { node: n })
        }
        (KeyCode::Char('m'), Some(n)) => m.prompt = Some((Prompt::Say(n), String::new())),
        (KeyCode::Char('a'), _) => m.prompt = Some((Prompt::Attach, String::new())),
        (KeyCode::Char('d'), _) => m.prompt = Some((Prompt::Detach, String::new())),
        (KeyCode::Char('v'), _) => {
            m.status = "checking that every node holds the same sequence…".into();
            act(cluster, tx, "check".into(), Request::Check);
        }
        _ => {}
    }
}

fn submit(m: &mut Model, prompt: Prompt, text: &str, cluster: &Cluster, tx: &mpsc::Sender<Answer>) {
    if text.is_empty() {
        m.status = "nothing typed; cancelled".into();
        return;
    }
    match prompt {
        Prompt::Say(node) => act(
            cluster,
            tx,
            format!("say as {node}"),
            Request::Say {
                node,
                text: text.to_string(),
            },
        ),
        Prompt::Detach => act(
            cluster,
            tx,
            format!("detach {text}"),
            Request::Detach { name: text.into() },
        ),
        Prompt::Attach => {
            let (name, config) = text.split_once(' ').unwrap_or((text, ""));
            let config = if config.trim().is_empty() {
                Ok("{}".to_string())
            } else {
                serde_yaml::from_str::<serde_yaml::Value>(config)
                    .map(|v| crate::config::yaml_to_json(&v))
                    .map_err(|e| format!("the configuration is neither YAML nor JSON: {e}"))
            };
            match config {
                Ok(config) => act(
                    cluster,
                    tx,
                    format!("attach {name}"),
                    Request::Attach {
                        name: name.into(),
                        config,
                    },
                ),
                Err(e) => m.status = format!("attach {name}: {e}"),
            }
        }
    }
}
