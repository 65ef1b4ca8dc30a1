//! Where a password comes from on the command line: the first line of
//! standard input, an environment variable, or a prompt without echo —
//! never an argument, which every user of the machine could read.

use std::io::{BufRead, IsTerminal, Read};

/// Longest password line read from standard input.
const MAX_LINE: u64 = 4096;

/// The first line of standard input, without its line end.
pub fn from_stdin() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .take(MAX_LINE)
        .read_line(&mut line)
        .map_err(|e| format!("reading the password from stdin: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// Asks on the terminal without echo; refused when there is no terminal to
/// ask on, with `hint` saying what to do instead.
pub fn prompt(question: &str, hint: &str) -> Result<String, String> {
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "no password given and no terminal to ask on: {hint}"
        ));
    }
    rpassword::prompt_password(question).map_err(|e| format!("reading the password: {e}"))
}
