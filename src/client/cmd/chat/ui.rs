//! How the chat looks: the users and their presence on the left, the
//! conversation with the chosen one on the right, the line being typed
//! below it, and one line of help or notice at the bottom.

use std::time::Instant;

use ratatui::layout::{Constraint, Layout, Position};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, List, ListItem, ListState, Paragraph};
use ratatui::Frame;

use super::super::events::clock;
use super::state::{Chat, Delivery, Shown};

const USERS_WIDTH: u16 = 32;

pub fn draw(frame: &mut Frame, chat: &Chat, now: Instant) {
    let [main, status] =
        Layout::vertical([Constraint::Min(4), Constraint::Length(1)]).areas(frame.area());
    let [users, right] =
        Layout::horizontal([Constraint::Length(USERS_WIDTH), Constraint::Min(20)]).areas(main);
    let [conversation, input] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(3)]).areas(right);

    let items: Vec<ListItem> = chat
        .users
        .iter()
        .map(|user| {
            let shown = chat.shown(user);
            let (mark, colour) = match shown {
                Shown::Online => ("●", Color::Green),
                Shown::Idle { .. } => ("◐", Color::Yellow),
                Shown::Offline => ("○", Color::DarkGray),
            };
            let mut spans = vec![
                Span::styled(format!("{mark} "), Style::default().fg(colour)),
                Span::raw(user.clone()),
                Span::styled(format!(" {}", shown.text(now)), Style::default().fg(colour)),
            ];
            if let Some(unread) = chat.unread.get(user) {
                spans.push(Span::styled(
                    format!(" [{unread} new]"),
                    Style::default().add_modifier(Modifier::BOLD),
                ));
            }
            ListItem::new(Line::from(spans))
        })
        .collect();
    let mut state = ListState::default().with_selected(chat.selected_user().map(|_| chat.selected));
    frame.render_stateful_widget(
        List::new(items)
            .block(Block::default().borders(Borders::ALL).title(" Users "))
            .highlight_style(Style::default().add_modifier(Modifier::REVERSED)),
        users,
        &mut state,
    );

    let with = chat.selected_user().unwrap_or("");
    let width = usize::from(conversation.width.saturating_sub(2)).max(1);
    let height = usize::from(conversation.height.saturating_sub(2));
    let mut rows: Vec<Line> = Vec::new();
    for line in chat.conversations.get(with).into_iter().flatten() {
        let who = if line.from == chat.me {
            "you"
        } else {
            line.from.as_str()
        };
        let (mark, style) = match &line.delivery {
            Delivery::Received => (String::new(), Style::default()),
            Delivery::Sending => (" …".into(), Style::default().fg(Color::DarkGray)),
            Delivery::Sent => (" ✓".into(), Style::default()),
            Delivery::Failed(why) => (
                format!(" ✗ not sent: {why}"),
                Style::default().fg(Color::Red),
            ),
        };
        let clock = clock(line.at);
        let text = format!("{} {who}: {}{mark}", &clock[..5], line.text);
        for row in wrap(&text, width) {
            rows.push(Line::styled(row, style));
        }
    }
    let skip = rows.len().saturating_sub(height);
    let title = if with.is_empty() {
        " No one to talk to yet ".to_owned()
    } else {
        format!(" {with} ")
    };
    frame.render_widget(
        Paragraph::new(rows.split_off(skip))
            .block(Block::default().borders(Borders::ALL).title(title)),
        conversation,
    );

    let inner = usize::from(input.width.saturating_sub(2)).max(1);
    let typed: Vec<char> = chat.input.chars().collect();
    let visible: String = typed[typed.len().saturating_sub(inner - 1)..]
        .iter()
        .collect();
    let cursor_x = input.x + 1 + visible.chars().count() as u16;
    frame.render_widget(
        Paragraph::new(visible).block(
            Block::default()
                .borders(Borders::ALL)
                .title(format!(" Message to {with} ")),
        ),
        input,
    );
    frame.set_cursor_position(Position::new(cursor_x, input.y + 1));

    let help = format!(
        "signed on as {} · ↑↓ choose · Enter sends · Esc quits",
        chat.me
    );
    let status_line = match &chat.notice {
        Some(notice) => Line::styled(
            notice.clone(),
            Style::default().add_modifier(Modifier::BOLD),
        ),
        None => Line::styled(help, Style::default().fg(Color::DarkGray)),
    };
    frame.render_widget(Paragraph::new(status_line), status);
}

/// Splits `text` into rows of at most `width` characters, at spaces where
/// it can.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut rows = Vec::new();
    for paragraph in text.split('\n') {
        let mut row = String::new();
        let mut row_len = 0;
        for word in paragraph.split(' ') {
            let mut word: Vec<char> = word.chars().collect();
            if row_len > 0 && row_len + 1 + word.len() > width {
                rows.push(std::mem::take(&mut row));
                row_len = 0;
            }
            while word.len() > width {
                let rest = word.split_off(width);
                if row_len > 0 {
                    rows.push(std::mem::take(&mut row));
                }
                rows.push(word.into_iter().collect());
                row_len = 0;
                word = rest;
            }
            if row_len > 0 {
                row.push(' ');
                row_len += 1;
            }
            row_len += word.len();
            row.extend(word);
        }
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn wrapping_breaks_at_spaces_and_splits_long_words() {
        assert_eq!(wrap("aa bb cc", 5), ["aa bb", "cc"]);
        assert_eq!(wrap("abcdefgh", 3), ["abc", "def", "gh"]);
        assert_eq!(wrap("a\nb", 10), ["a", "b"]);
    }
}
