//! Drawing the dashboard from a [`Model`]: pure, so render tests run it
//! against ratatui's test backend.

use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

use super::model::{ChatLine, Failover, Model, Prompt};

/// The keys, always on screen.
pub const HELP: &str = "↑/↓ select · c kill coordinator · x kill · s stop · o continue · r restart · m say · a attach · d detach · v check · q quit";

/// Draws everything.
pub fn draw(f: &mut Frame, m: &Model) {
    // The status and help lines first: they stay whatever the size.
    let outer = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Min(0), Constraint::Length(1), Constraint::Length(1)])
        .split(f.area());
    let area = outer[0];
    let node_height = (m.nodes.len() as u16 + 3).min(area.height / 3).max(4);
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([
            Constraint::Length(1),
            Constraint::Length(node_height),
            Constraint::Min(0),
        ])
        .split(area);
    f.render_widget(title(m), rows[0]);
    draw_nodes(f, m, rows[1]);
    let middle = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Percentage(50), Constraint::Percentage(50)])
        .split(rows[2]);
    draw_chat(f, m, middle[0]);
    let right = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Percentage(60), Constraint::Percentage(40)])
        .split(middle[1]);
    draw_failovers(f, m, right[0]);
    draw_bots(f, m, right[1]);
    f.render_widget(status_line(m), outer[1]);
    f.render_widget(
        Paragraph::new(HELP).style(Style::default().fg(Color::Black).bg(Color::Gray)),
        outer[2],
    );
}

fn title(m: &Model) -> Paragraph<'static> {
    let coord = match &m.coordinator {
        Some((name, epoch)) => format!("coordinator {name} (epoch {epoch})"),
        None => "no coordinator yet".into(),
    };
    let agree = match m.disagreeing() {
        0 => Span::styled("all nodes agree", Style::default().fg(Color::Green)),
        n => Span::styled(
            format!("{n} node(s) DISAGREE"),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
    };
    Paragraph::new(Line::from(vec![
        Span::styled(
            format!("p2pctl watch · cluster {} · ", m.cluster),
            Style::default().add_modifier(Modifier::BOLD),
        ),
        Span::raw(format!("{coord} · {} nodes · ", m.nodes.len())),
        agree,
    ]))
}

fn draw_nodes(f: &mut Frame, m: &Model, area: Rect) {
    let header = Row::new(
        [
            "NODE", "PID", "STATE", "ROLE", "EPOCH", "VOTER", "RESTARTS", "UPTIME", "LAST SEQ", "AGREES",
        ]
        .map(|h| Cell::from(h).style(Style::default().add_modifier(Modifier::BOLD))),
    );
    let rows = m.nodes.iter().enumerate().map(|(i, n)| {
        let agrees = match n.differs_at {
            None => Cell::from("yes").style(Style::default().fg(Color::Green)),
            Some(seq) => Cell::from(format!("NO at seq {seq}")).style(Style::default().fg(Color::Red)),
        };
        // A node that cannot make progress says so where its role is.
        let role = match (&n.waiting, &n.role) {
            (Some(_), _) => "waiting".to_string(),
            (None, r) => r.clone().unwrap_or_else(|| "-".into()),
        };
        let role_style = match role.as_str() {
            "coordinator" => Style::default().fg(Color::Yellow).add_modifier(Modifier::BOLD),
            "waiting" | "electing" => Style::default().fg(Color::Red),
            _ => Style::default(),
        };
        let state_style = match n.state.as_str() {
            "running" => Style::default().fg(Color::Green),
            "paused" => Style::default().fg(Color::Magenta),
            _ => Style::default().fg(Color::Red),
        };
        let row = Row::new(vec![
            Cell::from(format!("{} {}", if i == m.selected { "▶" } else { " " }, n.name)),
            Cell::from(n.pid.map_or("-".into(), |p| p.to_string())),
            Cell::from(n.state.clone()).style(state_style),
            Cell::from(role).style(role_style),
            Cell::from(n.epoch.to_string()),
            Cell::from(if n.voter { "yes" } else { "no" }),
            Cell::from(n.restarts.to_string()),
            Cell::from(n.uptime_ms.map_or("-".into(), uptime)),
            Cell::from(n.last_seq.to_string()),
            agrees,
        ]);
        if i == m.selected {
            row.style(Style::default().add_modifier(Modifier::REVERSED))
        } else {
            row
        }
    });
    let widths = [
        Constraint::Length(14),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(12),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Min(8),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::default().borders(Borders::ALL).title(" nodes "));
    f.render_widget(table, area);
}

fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{}.{}s", s, (ms % 1000) / 100)
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

fn draw_chat(f: &mut Frame, m: &Model, area: Rect) {
    let height = area.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = m
        .chat
        .iter()
        .skip(m.chat.len().saturating_sub(height))
        .map(chat_line)
        .collect();
    let chat = Paragraph::new(lines)
        .block(Block::default().borders(Borders::ALL).title(" chat (seq order) "))
        .wrap(Wrap { trim: false });
    f.render_widget(chat, area);
}

fn chat_line(l: &ChatLine) -> Line<'static> {
    let dim = Style::default().fg(Color::DarkGray);
    match l {
        ChatLine::Message {
            seq,
            epoch,
            from,
            text,
            bot,
        } => {
            let mut spans = vec![
                Span::styled(format!("{seq:>5} "), dim),
                Span::styled(
                    format!("{from}: "),
                    Style::default().fg(Color::Cyan).add_modifier(Modifier::BOLD),
                ),
                Span::raw(text.clone()),
            ];
            if *bot {
                spans.push(Span::styled(" [bot]", Style::default().fg(Color::Magenta)));
            }
            spans.push(Span::styled(format!(" e{epoch}"), dim));
            Line::from(spans)
        }
        ChatLine::Verdict {
            plugin,
            action,
            member,
            rule,
        } => Line::from(Span::styled(
            format!("      ⚑ {plugin}: {action} {member}'s message ({rule})"),
            Style::default().fg(Color::Magenta),
        )),
        ChatLine::Notice(text) => Line::from(Span::styled(format!("      * {text}"), dim)),
    }
}

fn draw_failovers(f: &mut Frame, m: &Model, area: Rect) {
    let header = Row::new(
        ["LOST", "CAUSE", "DETECTED", "NEW", "ELECTION", "FLOWING"]
            .map(|h| Cell::from(h).style(Style::default().add_modifier(Modifier::BOLD))),
    );
    let height = area.height.saturating_sub(3) as usize;
    let rows = m
        .failovers
        .iter()
        .skip(m.failovers.len().saturating_sub(height))
        .map(failover_row);
    let widths = [
        Constraint::Length(9),
        Constraint::Min(10),
        Constraint::Length(9),
        Constraint::Length(12),
        Constraint::Length(9),
        Constraint::Length(9),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::default().borders(Borders::ALL).title(" failovers "));
    f.render_widget(table, area);
}

fn failover_row(fo: &Failover) -> Row<'static> {
    let ms = |v: Option<f64>| v.map_or("…".to_string(), |v| format!("{v:.1} ms"));
    Row::new(vec![
        Cell::from(fo.lost.clone()),
        Cell::from(fo.cause.clone()),
        Cell::from(ms(fo.detected_ms)),
        Cell::from(match (&fo.new_coordinator, fo.epoch) {
            (Some(n), Some(e)) => format!("{n} (e{e})"),
            _ => "electing…".into(),
        }),
        Cell::from(fo.election_ms.map_or("…".into(), |v| format!("{v} ms"))),
        Cell::from(ms(fo.flowing_ms)).style(Style::default().fg(Color::Green)),
    ])
}

fn draw_bots(f: &mut Frame, m: &Model, area: Rect) {
    let mut lines = vec![Line::from(Span::styled(
        format!(
            "{:<12}{:<9}{:<13}{:>7}{:>7}{:>10}",
            "BOT", "VERSION", "STATE", "CALLS", "DROPS", "TIME"
        ),
        Style::default().add_modifier(Modifier::BOLD),
    ))];
    for b in &m.bots {
        let style = if b.state == "active" {
            Style::default().fg(Color::Green)
        } else {
            Style::default().fg(Color::Red)
        };
        lines.push(Line::from(vec![
            Span::raw(format!("{:<12}{:<9}", b.name, b.version)),
            Span::styled(format!("{:<13}", b.state), style),
            Span::raw(format!(
                "{:>7}{:>7}{:>10}",
                b.calls,
                b.drops,
                format!("{:.1} ms", b.time_us as f64 / 1000.0)
            )),
        ]));
        if let Some(e) = &b.error {
            lines.push(Line::from(Span::styled(format!("  ↳ {e}"), style)));
        }
    }
    let bots = Paragraph::new(lines)
        .block(Block::default().borders(Borders::ALL).title(" bots "))
        .wrap(Wrap { trim: false });
    f.render_widget(bots, area);
}

fn status_line(m: &Model) -> Paragraph<'static> {
    match &m.prompt {
        Some((p, text)) => {
            let label = match p {
                Prompt::Say(node) => format!("say as {node}> "),
                Prompt::Attach => "attach NAME [JSON or YAML config]> ".into(),
                Prompt::Detach => "detach NAME> ".into(),
            };
            Paragraph::new(Line::from(vec![
                Span::styled(label, Style::default().fg(Color::Yellow)),
                Span::raw(format!("{text}▏")),
                Span::styled(
                    "  (Enter send · Esc cancel)",
                    Style::default().fg(Color::DarkGray),
                ),
            ]))
        }
        None => Paragraph::new(m.status.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::CtlEvent;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use serde_json::json;
    use std::time::{Duration, Instant};

    fn text_of(t: &Terminal<TestBackend>) -> String {
        let buf = t.backend().buffer();
        let mut out = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                out.push_str(buf[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn model() -> Model {
        let t0 = Instant::now();
        let mut m = Model::new("demo");
        m.apply_ps(&json!([
            {"name":"alice","pid":101,"state":"exited","role":null,"epoch":1,"voter":false,"restarts":0,"uptime_ms":null},
            {"name":"bob","pid":102,"state":"running","role":"coordinator","epoch":2,"voter":true,"restarts":0,"uptime_ms":65000},
            {"name":"carol","pid":103,"state":"paused","role":"member","epoch":2,"voter":true,"restarts":1,"uptime_ms":4200},
        ]));
        m.coordinator = Some(("alice".into(), 1));
        m.apply_event(
            &CtlEvent::Process {
                node: "alice".into(),
                what: "sent SIGKILL by p2pctl kill".into(),
            },
            t0,
        );
        m.apply_event(
            &CtlEvent::Coordinator {
                node: "bob".into(),
                epoch: 2,
                election_ms: Some(2),
                since_kill_ms: Some(2.5),
            },
            t0 + Duration::from_millis(3),
        );
        for (node, seq, text, bot) in [
            ("bob", 7, "hello there", json!(null)),
            ("carol", 8, "the echo", json!("echo")),
        ] {
            m.apply_event(
                &CtlEvent::Node {
                    node: node.into(),
                    event: json!({"event":"message","seq":seq,"epoch":2,"from":node,"text":text,"bot":bot}),
                },
                t0 + Duration::from_millis(6),
            );
        }
        m.apply_event(
            &CtlEvent::Node {
                node: "bob".into(),
                event: json!({"event":"verdict","plugin":"moderation","action":"drop","member":"carol","rule":"rate-limit"}),
            },
            t0 + Duration::from_millis(7),
        );
        m.apply_plugins(&json!({"coordinator":"bob","plugins":[
            {"name":"echo","version":"0.1.0","state":"active","calls":12,"drops":0,"time_us":800},
            {"name":"test_panic","version":"0.0.1","state":"quarantined","calls":1,"drops":0,"time_us":3,"error":"it panicked"}
        ]}));
        m
    }

    #[test]
    fn every_panel_shows_what_the_model_holds() {
        let mut t = Terminal::new(TestBackend::new(150, 36)).unwrap();
        let m = model();
        t.draw(|f| draw(f, &m)).unwrap();
        let screen = text_of(&t);
        for want in [
            "cluster demo",
            "coordinator bob (epoch 2)",
            "all nodes agree",
            "▶ alice",
            "exited",
            "paused",
            "1m05s",
            "hello there",
            "the echo [bot]",
            "⚑ moderation: drop carol's message (rate-limit)",
            "SIGKILL (p2pctl)",
            "bob (e2)",
            "2 ms",
            "6.0 ms",
            "quarantined",
            "↳ it panicked",
            "c kill coordinator",
        ] {
            assert!(screen.contains(want), "{want:?} not on screen:\n{screen}");
        }
    }

    #[test]
    fn the_help_line_and_prompt_survive_a_small_terminal() {
        let mut m = model();
        m.prompt = Some((Prompt::Say("bob".into()), "hi".into()));
        for (w, h) in [(60, 12), (20, 5), (1, 1), (200, 3)] {
            let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
            t.draw(|f| draw(f, &m)).unwrap();
            if w >= 20 && h >= 2 {
                let screen = text_of(&t);
                assert!(screen.contains("say as bob>"), "{screen}");
                assert!(screen.contains("↑/↓ select"), "{screen}");
            }
        }
        let mut m = model();
        m.nodes[2].differs_at = Some(8);
        let mut t = Terminal::new(TestBackend::new(150, 36)).unwrap();
        t.draw(|f| draw(f, &m)).unwrap();
        let screen = text_of(&t);
        assert!(
            screen.contains("1 node(s) DISAGREE") && screen.contains("NO at seq 8"),
            "{screen}"
        );
    }

    /// A node that cannot make progress shows "waiting" as its role, and
    /// what it said is among the notices.
    #[test]
    fn a_waiting_node_shows_it_in_the_table_and_the_notices() {
        let mut m = model();
        m.apply_event(
            &CtlEvent::Node {
                node: "carol".into(),
                event: json!({"event":"waiting","reason":"waiting for a majority of voters: 1 of 3 agree"}),
            },
            Instant::now(),
        );
        let mut rows = json!([
            {"name":"alice","pid":101,"state":"exited","role":null,"epoch":1,"voter":false,"restarts":0,"uptime_ms":null},
            {"name":"bob","pid":102,"state":"running","role":"coordinator","epoch":2,"voter":true,"restarts":0,"uptime_ms":65000},
            {"name":"carol","pid":103,"state":"running","role":"electing","epoch":2,"voter":true,"restarts":1,"uptime_ms":4200,
             "waiting":"waiting for a majority of voters: 1 of 3 agree"},
        ]);
        m.apply_ps(&rows);
        let mut t = Terminal::new(TestBackend::new(150, 36)).unwrap();
        t.draw(|f| draw(f, &m)).unwrap();
        let screen = text_of(&t);
        let carol = screen
            .lines()
            .find(|l| l.contains("carol") && l.contains("103"))
            .unwrap();
        assert!(carol.contains("waiting"), "{screen}");
        assert!(screen.contains("carol waits: waiting for a majority"), "{screen}");
        rows[2]["waiting"] = json!(null);
        m.apply_ps(&rows);
        t.draw(|f| draw(f, &m)).unwrap();
        let screen = text_of(&t);
        let carol = screen
            .lines()
            .find(|l| l.contains("carol") && l.contains("103"))
            .unwrap();
        assert!(
            carol.contains("electing") && !carol.contains("waiting"),
            "{screen}"
        );
    }
}
