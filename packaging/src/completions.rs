//! Shell completions (bash, zsh, fish), from clap_complete.

use clap_complete::Shell;

use crate::commands::Installed;

/// The shells the package ships completions for (each into that shell's Debian directory).
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// The file name each shell's completion loader looks for.
pub fn file_name(shell: Shell, command: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{command}"),
        Shell::Fish => format!("{command}.fish"),
        _ => command.to_string(),
    }
}

/// The completion script of `c` for `shell`.
pub fn render(c: &Installed, shell: Shell) -> Vec<u8> {
    let mut cmd = c.command.clone();
    let name = c.name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    script
}
