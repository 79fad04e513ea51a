//! `/etc/default/umemd`: the options umemd.service adds to umemd's command line, with every
//! flag umemd takes listed in comments, from its clap definition.

use clap::{Arg, Command};

/// Flags the file does not offer: the unit gives --socket itself (and systemd the listener).
const SET_BY_THE_UNIT: [&str; 1] = ["socket"];

/// Examples shown commented out; each must parse as umemd's arguments (tested).
pub const EXAMPLES: [&str; 3] = [
    "--allow-gid kvm --max-sessions 16",
    "--secret-file /etc/umem/host.key",
    "--tls-creds /etc/umem/tls",
];

const WIDTH: usize = 92;

/// The file's text.
pub fn render(umemd: &Command) -> String {
    let mut s = String::new();
    s.push_str(
        "# Options for umemd, read by umemd.service (EnvironmentFile=-/etc/default/umemd), which\n\
         # runs: umemd --socket /run/umem/umemd.sock $UMEMD_OPTS\n\
         # After a change: systemctl restart umemd.service. See umemd(8).\n\
         #\n\
         # The options umemd takes (--socket is the unit's):\n#\n",
    );
    for arg in umemd.get_arguments().filter(|a| offered(a)) {
        s.push_str(&format!("#   {}\n", synopsis(arg)));
        let mut help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        if !defaults.is_empty() {
            help.push_str(&format!(" (default {})", defaults.join(", ")));
        }
        for line in wrap(&help, WIDTH - "#       ".len()) {
            s.push_str(&format!("#       {line}\n"));
        }
    }
    s.push_str("#\n# For example:\n");
    for e in EXAMPLES {
        s.push_str(&format!("#UMEMD_OPTS=\"{e}\"\n"));
    }
    s.push_str("UMEMD_OPTS=\"\"\n\n");
    s.push_str(
        "# Log level: error, warn, info (the unit's default), debug or trace.\n#RUST_LOG=debug\n",
    );
    s
}

fn offered(arg: &Arg) -> bool {
    let id = arg.get_id().as_str();
    arg.get_long().is_some()
        && !SET_BY_THE_UNIT.contains(&id)
        && !matches!(id, "help" | "version")
        && !arg.is_hide_set()
}

/// `--flag VALUE`, or `--flag` for a switch.
fn synopsis(arg: &Arg) -> String {
    let long = format!("--{}", arg.get_long().unwrap_or_default());
    if !arg.get_action().takes_values() {
        return long;
    }
    let value = match arg.get_value_names() {
        Some(names) => names
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        None => arg.get_id().as_str().to_uppercase(),
    };
    format!("{long} {value}")
}

/// Words of `text` in lines of at most `width` characters (a longer word gets a line of its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn every_example_parses_as_umemds_arguments() {
        for e in EXAMPLES {
            let argv = std::iter::once("umemd").chain(e.split_whitespace());
            if let Err(err) = umemd::cli::Args::try_parse_from(argv) {
                panic!("example UMEMD_OPTS=\"{e}\" is not valid: {err}");
            }
        }
    }

    #[test]
    fn every_flag_but_the_units_is_listed_and_the_file_sets_umemd_opts() {
        let cmd = umemd::cli::Args::command();
        let text = render(&cmd);
        let mut listed = 0;
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let line = format!("#   --{long}");
            let shown = text
                .lines()
                .any(|l| l == line || l.starts_with(&format!("{line} ")));
            let expected = !matches!(long, "help" | "version" | "socket");
            assert_eq!(
                shown, expected,
                "--{long} listed: {shown}, expected {expected}"
            );
            listed += usize::from(shown);
        }
        assert!(listed >= 5, "only {listed} flags listed");
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("UMEMD_OPTS="))
                .count(),
            1,
            "exactly one uncommented UMEMD_OPTS line"
        );
        assert!(
            text.lines().all(|l| l.len() <= WIDTH),
            "a line is wider than {WIDTH}"
        );
    }

    #[test]
    fn wrap_keeps_every_word_in_order_within_the_width() {
        let text = "one two three four five six seven eight nine ten eleven";
        let lines = wrap(text, 12);
        assert!(lines.iter().all(|l| l.len() <= 12), "{lines:?}");
        assert_eq!(lines.join(" "), text);
        assert_eq!(
            wrap("averyveryverylongword x", 5),
            ["averyveryverylongword", "x"]
        );
    }
}
