//! `tracer top`: a live terminal view of a running daemon's connections. Reads the daemon's
//! live table every second ([`crate::export::live::fetch`]), keeps the viewer's choices (keys) in a
//! [`model::View`], and draws what the pure [`model`] makes of both with ratatui ([`draw`]).

mod draw;
pub mod model;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ratatui::{
    DefaultTerminal,
    crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
};

use crate::{
    config::cli::TopArgs,
    export::live::{self, Row, typed},
};
use model::{GroupKey, LineKind, View};

/// Refresh pace: the daemon's tick.
const REFRESH: Duration = Duration::from_secs(1);

/// The keys, as the help line shows them.
pub const HELP: &str =
    "q:quit j/k:move enter:open x:all s:sort g:group /:filter t:state p:problems";

/// Reads the table once before touching the terminal, so that without a daemon `top`
/// prints one line (by the caller) and exits non-zero with the terminal untouched.
pub fn run(args: &TopArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let addr = args.metrics_addr;
    let rows = runtime.block_on(live::fetch(addr)).map_err(|err| {
        anyhow::anyhow!(
            "{err}; top draws the live table of a running `tracer run` (--metrics-addr)"
        )
    })?;
    let mut app = App::new(addr, typed(&rows));
    // Raw mode and the alternate screen; ratatui's panic hook restores the terminal too.
    let mut terminal = ratatui::init();
    let result = app.run(&mut terminal, &runtime);
    ratatui::restore();
    result
}

/// What the screen shows, in the order drawn; built by [`App::screen`], drawn by [`draw`].
pub struct Screen {
    pub title: String,
    /// Totals, or why the table is not fresh.
    pub summary: String,
    pub stale: bool,
    pub header: String,
    pub lines: Vec<model::ScreenLine>,
    pub selected: usize,
    pub footer: String,
}

enum Flow {
    Continue,
    Quit,
}

struct App {
    addr: SocketAddr,
    rows: Vec<Row>,
    view: View,
    selected: usize,
    /// The filter being typed after `/`.
    editing: Option<String>,
    /// Why the last refresh failed; the last table stays on screen.
    error: Option<String>,
    fetched: Instant,
}

impl App {
    fn new(addr: SocketAddr, rows: Vec<Row>) -> Self {
        Self {
            addr,
            rows,
            view: View::default(),
            selected: 0,
            editing: None,
            error: None,
            fetched: Instant::now(),
        }
    }

    fn run(
        &mut self,
        terminal: &mut DefaultTerminal,
        runtime: &tokio::runtime::Runtime,
    ) -> anyhow::Result<()> {
        loop {
            terminal.draw(|frame| {
                let width = usize::from(frame.area().width);
                draw::frame(frame, &self.screen(width));
            })?;
            let wait = REFRESH.saturating_sub(self.fetched.elapsed());
            if event::poll(wait)?
                && let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
                && matches!(self.key(key), Flow::Quit)
            {
                return Ok(());
            }
            if self.fetched.elapsed() >= REFRESH {
                self.fetched = Instant::now();
                match runtime.block_on(live::fetch(self.addr)) {
                    Ok(rows) => {
                        self.rows = typed(&rows);
                        self.error = None;
                    }
                    Err(err) => self.error = Some(err.to_string()),
                }
            }
        }
    }

    fn screen(&mut self, width: usize) -> Screen {
        let groups = model::groups(&self.rows, &self.view);
        let lines = model::lines(&groups, &self.view, width);
        self.selected = self.selected.min(lines.len().saturating_sub(1));
        let state = self.view.state.map_or("all", |s| s.as_str());
        let filter = if self.view.text.is_empty() {
            "-"
        } else {
            &self.view.text
        };
        Screen {
            title: format!(
                "tracer top {}  sort:{} group:{} state:{} filter:{}{}",
                self.addr,
                self.view.sort.label(),
                self.view.group_by.label(),
                state,
                filter,
                if self.view.problems_only {
                    " problems-only"
                } else {
                    ""
                },
            ),
            summary: match &self.error {
                Some(err) => format!("not refreshed: {err}"),
                None => model::summary(&self.rows, &self.view),
            },
            stale: self.error.is_some(),
            header: model::header(&self.view, width),
            lines,
            selected: self.selected,
            footer: match &self.editing {
                Some(text) => format!("filter: {text}_   (enter apply, esc clear)"),
                None => HELP.to_owned(),
            },
        }
    }

    /// The group of the selected line, and whether that line is the group's own.
    fn selected_group(&self) -> Option<(GroupKey, bool)> {
        let groups = model::groups(&self.rows, &self.view);
        let lines = model::lines(&groups, &self.view, usize::MAX);
        lines
            .get(self.selected)
            .map(|l| (l.group.clone(), l.kind == LineKind::Group))
    }

    /// Moves the selection to the line of `key`'s group.
    fn select_group(&mut self, key: &GroupKey) {
        let groups = model::groups(&self.rows, &self.view);
        let lines = model::lines(&groups, &self.view, usize::MAX);
        if let Some(at) = lines
            .iter()
            .position(|l| l.kind == LineKind::Group && &l.group == key)
        {
            self.selected = at;
        }
    }

    fn key(&mut self, key: KeyEvent) -> Flow {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Flow::Quit;
        }
        if let Some(text) = &mut self.editing {
            match key.code {
                KeyCode::Enter => {
                    self.view.text = std::mem::take(text);
                    self.editing = None;
                    self.selected = 0;
                }
                KeyCode::Esc => {
                    self.editing = None;
                    self.view.text.clear();
                }
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => {}
            }
            return Flow::Continue;
        }
        match key.code {
            KeyCode::Char('q') => return Flow::Quit,
            KeyCode::Down | KeyCode::Char('j') => self.selected = self.selected.saturating_add(1),
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Enter | KeyCode::Char(' ') | KeyCode::Right | KeyCode::Left => {
                if let Some((group, _)) = self.selected_group() {
                    let open = self.view.expanded.contains(&group);
                    let want = match key.code {
                        KeyCode::Right => true,
                        KeyCode::Left => false,
                        _ => !open,
                    };
                    if want {
                        self.view.expanded.insert(group.clone());
                    } else {
                        self.view.expanded.remove(&group);
                    }
                    self.select_group(&group);
                }
            }
            KeyCode::Char('x') => {
                let groups = model::groups(&self.rows, &self.view);
                let all: Vec<GroupKey> = groups.into_iter().map(|g| g.key).collect();
                if all.iter().all(|k| self.view.expanded.contains(k)) {
                    self.view.expanded.clear();
                } else {
                    self.view.expanded.extend(all);
                }
                self.selected = 0;
            }
            KeyCode::Char('s') => self.view.sort = self.view.sort.next(),
            KeyCode::Char('g') => {
                self.view.group_by = self.view.group_by.next();
                self.view.expanded.clear();
                self.selected = 0;
            }
            KeyCode::Char('t') => {
                self.view.state = model::next_state_filter(self.view.state);
                self.selected = 0;
            }
            KeyCode::Char('p') => {
                self.view.problems_only = !self.view.problems_only;
                self.selected = 0;
            }
            KeyCode::Char('/') => self.editing = Some(self.view.text.clone()),
            KeyCode::Esc => self.view.text.clear(),
            _ => {}
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use ratatui::crossterm::event::KeyEvent;

    use super::*;
    use crate::model::detectors::ConnState;

    fn row(conn_id: &str, pid: u32, comm: &str) -> Row {
        Row {
            conn_id: conn_id.into(),
            pid,
            comm: comm.into(),
            state: Some(ConnState::IdleInTransaction),
            ..Row::default()
        }
    }

    fn app() -> App {
        App::new(
            "127.0.0.1:9433".parse().expect("addr"),
            vec![
                row("1", 10, "worker"),
                row("2", 10, "worker"),
                row("3", 20, "web"),
            ],
        )
    }

    fn press(app: &mut App, code: KeyCode) -> bool {
        matches!(app.key(KeyEvent::from(code)), Flow::Quit)
    }

    #[test]
    fn the_help_line_fits_80_columns() {
        assert!(HELP.len() <= 80, "{} columns", HELP.len());
        assert!(app().screen(80).title.len() <= 80);
    }

    #[test]
    fn keys_expand_filter_and_quit() {
        let mut app = app();
        assert_eq!(app.screen(80).lines.len(), 2, "two collapsed groups");
        // Enter on the first group opens it: its column names and two connections.
        assert!(!press(&mut app, KeyCode::Enter));
        assert_eq!(app.screen(80).lines.len(), 2 + 3);
        assert!(app.view.expanded.contains(&GroupKey::Process(10)));
        // Down into its connections, enter closes the group and selects its line.
        press(&mut app, KeyCode::Down);
        press(&mut app, KeyCode::Down);
        press(&mut app, KeyCode::Enter);
        assert!(app.view.expanded.is_empty());
        assert_eq!(app.selected, 0);

        // `/web` enter: only the web process; esc clears.
        press(&mut app, KeyCode::Char('/'));
        for c in "web".chars() {
            press(&mut app, KeyCode::Char(c));
        }
        assert!(app.screen(80).footer.starts_with("filter: web_"));
        press(&mut app, KeyCode::Enter);
        let screen = app.screen(80);
        assert_eq!(screen.lines.len(), 1);
        assert!(screen.lines[0].text.contains("web"));
        assert!(screen.title.contains("filter:web"));
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.screen(80).lines.len(), 2);

        // `q` typed into the filter is text, not quit.
        press(&mut app, KeyCode::Char('/'));
        assert!(!press(&mut app, KeyCode::Char('q')));
        press(&mut app, KeyCode::Esc);
        assert!(press(&mut app, KeyCode::Char('q')));
        assert!(matches!(
            app.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Flow::Quit
        ));
    }
}
