//! How admin replies look: aligned tables for people, JSON for machines,
//! and attachments saved (through `crate::save`).

use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;
use csm_actors::store::unix_now;

use super::protocol::{MessageView, Reply};

/// Prints a reply as a table (or JSON with `json`).
pub fn print_reply(reply: &Reply, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(reply).unwrap_or_default()
        );
        return;
    }
    match reply {
        Reply::Done { message } => println!("{message}"),
        Reply::Users { live, users } => {
            let rows: Vec<Vec<String>> = users
                .iter()
                .map(|u| {
                    vec![
                        u.name.clone(),
                        u.status
                            .map_or_else(|| "-".into(), |s| format!("{s:?}").to_uppercase()),
                        u.idle_secs.map_or_else(|| "-".into(), format_secs),
                        if *live {
                            u.sessions.to_string()
                        } else {
                            "-".into()
                        },
                    ]
                })
                .collect();
            print_table(&["USER", "STATUS", "IDLE", "SESSIONS"], &rows);
            if !live {
                println!("(no server running: presence unknown)");
            }
        }
        Reply::Mailbox { items } => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|m| {
                    vec![
                        m.user.clone(),
                        m.id.clone(),
                        m.sender.clone(),
                        m.recipients.join(","),
                        format_bytes(m.size),
                        age(m.stored_unix),
                        m.attachments
                            .iter()
                            .map(|(name, size)| format!("{name} ({})", format_bytes(*size)))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ]
                })
                .collect();
            print_table(
                &["USER", "ID", "FROM", "TO", "SIZE", "AGE", "ATTACHMENTS"],
                &rows,
            );
        }
        Reply::Message { message } => {
            println!("id:         {}", message.id);
            println!("from:       {}", message.sender);
            println!("to:         {}", message.recipients.join(", "));
            println!("size:       {}", format_bytes(message.size));
            println!("stored:     {} ago", age(message.stored_unix));
            println!();
            println!("{}", message.text);
            if !message.attachments.is_empty() {
                println!();
                let rows: Vec<Vec<String>> = message
                    .attachments
                    .iter()
                    .map(|a| vec![a.name.clone(), format_bytes(a.size)])
                    .collect();
                print_table(&["ATTACHMENT", "SIZE"], &rows);
            }
        }
        Reply::Stats {
            users,
            total_messages,
            total_bytes,
        } => {
            let mut rows: Vec<Vec<String>> = users
                .iter()
                .map(|u| {
                    vec![
                        u.user.clone(),
                        u.messages.to_string(),
                        format_bytes(u.bytes),
                    ]
                })
                .collect();
            rows.push(vec![
                "TOTAL".into(),
                total_messages.to_string(),
                format_bytes(*total_bytes),
            ]);
            print_table(&["USER", "MESSAGES", "BYTES"], &rows);
        }
        Reply::Sessions { sessions } => {
            let clustered = sessions.iter().any(|s| s.node.is_some());
            let rows: Vec<Vec<String>> = sessions
                .iter()
                .map(|s| {
                    let mut row = vec![
                        s.user.clone(),
                        format!("{:?}", s.status).to_uppercase(),
                        s.idle_secs.map_or_else(|| "-".into(), format_secs),
                        s.session_count.to_string(),
                        s.peer.clone(),
                        format!("{} ago", age(s.connected_unix)),
                    ];
                    if clustered {
                        row.push(s.node.clone().unwrap_or_default());
                    }
                    row
                })
                .collect();
            let mut headers = vec!["USER", "STATUS", "IDLE", "SESSIONS", "PEER", "CONNECTED"];
            if clustered {
                headers.push("NODE");
            }
            print_table(&headers, &rows);
        }
    }
}

/// Writes each attachment of `message` into `dir` under a safe name.
pub fn save_attachments(message: &MessageView, dir: &Path, json: bool) -> io::Result<Vec<PathBuf>> {
    let engine = base64::engine::general_purpose::STANDARD;
    let mut decoded = Vec::new();
    for attachment in &message.attachments {
        if let Some(b64) = &attachment.data_base64 {
            let bytes = engine
                .decode(b64)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            decoded.push((attachment.name.clone(), bytes));
        }
    }
    let written = crate::save::write_files(
        dir,
        decoded
            .iter()
            .map(|(name, bytes)| (name.clone(), bytes.as_slice())),
        &[],
        false,
    )?;
    if !json {
        for path in &written {
            eprintln!("saved {}", path.display());
        }
    }
    Ok(written)
}

/// `90` → `1m30s`.
pub fn format_secs(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{:02}h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

fn age(unix: u64) -> String {
    format_secs(unix_now().saturating_sub(unix))
}

/// `1536` → `1.5 KiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Prints rows under headers, columns aligned.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(format_secs(90), "1m30s");
        assert_eq!(format_secs(7200), "2h00m");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(12), "12 B");
    }
}
