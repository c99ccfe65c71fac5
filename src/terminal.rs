//! What the CLI shows a person at a terminal and nobody else: a QR code of the page to open
//! during a device login, and a status table in colour. Scripts (`--json`, pipes, files) get
//! plain, stable text.

use crate::wire::ConnectionView;
use authkeeper_state::StateName;
use std::io::IsTerminal;

/// Standard output is a terminal.
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// Colour on stdout: a terminal that is not `dumb`, and `NO_COLOR` unset.
pub fn colour() -> bool {
    stdout_is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// `url` as a QR code of half-block characters (two rows of modules per line), with its quiet
/// zone; `None` when it does not fit in a QR code.
pub fn qr(url: &str) -> Option<String> {
    let code = qrcode::QrCode::new(url.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build(),
    )
}

/// One status row's cells: connection, state, account, expiry, note.
pub type Row = [String; 5];

const HEADER: [&str; 5] = ["CONNECTION", "STATE", "ACCOUNT", "EXPIRES", "NOTE"];

fn paint(state: StateName) -> &'static str {
    match state {
        StateName::Connected => "\x1b[32m",
        StateName::Pending => "\x1b[33m",
        StateName::Expired => "\x1b[31m",
        StateName::Disconnected => "\x1b[2m",
    }
}

/// The table: columns as wide as their widest cell; the state coloured when `colour`.
pub fn table(views: &[ConnectionView], rows: &[Row], colour: bool) -> String {
    let width = |i: usize| rows.iter().map(|r| r[i].chars().count()).chain([HEADER[i].len()]).max().unwrap_or(0);
    let widths: Vec<usize> = (0..4).map(width).collect();
    let mut out = String::new();
    let mut line = |cells: [&str; 5], state: Option<StateName>| {
        for (i, cell) in cells.iter().enumerate().take(4) {
            let pad = widths[i] - cell.chars().count() + 2;
            match (i, state) {
                (1, Some(s)) if colour => out.push_str(&format!("{}{cell}\x1b[0m", paint(s))),
                _ => out.push_str(cell),
            }
            out.push_str(&" ".repeat(pad));
        }
        out.push_str(cells[4]);
        out.push('\n');
    };
    line(HEADER, None);
    for (v, r) in views.iter().zip(rows) {
        line([&r[0], &r[1], &r[2], &r[3], &r[4]], Some(v.state));
    }
    out
}
