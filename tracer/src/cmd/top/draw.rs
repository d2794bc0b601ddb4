//! Drawing of `tracer top`: puts a [`Screen`] on the terminal with ratatui. Title and
//! totals on top, the table header, the lines (scrolled to keep the selection in view;
//! leaks and stalls in red, open transactions in yellow), the keys at the bottom.

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::Paragraph,
};

use super::{
    Screen,
    model::{LineKind, Severity},
};

fn style(severity: Severity, kind: LineKind) -> Style {
    let style = match severity {
        Severity::Normal => Style::new(),
        Severity::Notice => Style::new().fg(Color::Yellow),
        Severity::Leak => Style::new().fg(Color::LightRed),
        Severity::Stall => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
    };
    match kind {
        LineKind::Group => style.add_modifier(Modifier::BOLD),
        LineKind::Columns => style.add_modifier(Modifier::DIM | Modifier::UNDERLINED),
        LineKind::Conn | LineKind::Held => style,
    }
}

pub(super) fn frame(frame: &mut Frame, screen: &Screen) {
    let [title, summary, header, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    frame.render_widget(
        Paragraph::new(screen.title.as_str()).style(Style::new().add_modifier(Modifier::BOLD)),
        title,
    );
    let summary_style = if screen.stale {
        Style::new().fg(Color::Red)
    } else {
        Style::new()
    };
    frame.render_widget(
        Paragraph::new(screen.summary.as_str()).style(summary_style),
        summary,
    );
    frame.render_widget(
        Paragraph::new(screen.header.as_str()).style(Style::new().add_modifier(Modifier::REVERSED)),
        header,
    );

    // Scroll so the selected line stays visible.
    let rows = usize::from(body.height);
    let first = screen
        .selected
        .saturating_sub(rows.saturating_sub(1))
        .min(screen.lines.len().saturating_sub(rows));
    let lines: Vec<Line> = screen
        .lines
        .iter()
        .enumerate()
        .skip(first)
        .take(rows)
        .map(|(at, line)| {
            let style = style(line.severity, line.kind);
            let style = if at == screen.selected {
                style.add_modifier(Modifier::REVERSED)
            } else {
                style
            };
            Line::styled(line.text.as_str(), style)
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), body);
    frame.render_widget(
        Paragraph::new(screen.footer.as_str()).style(Style::new().add_modifier(Modifier::DIM)),
        footer,
    );
}
