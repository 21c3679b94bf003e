//! Where `leasehold-server` keeps its state file when `--state-file` is not given.
//!
//! Never the current directory: a server started from `/` or from a checkout would scatter
//! state files, and a restart from another directory would miss the previous run's state
//! (and so its hold-back after a crash). The places follow what the system provides: systemd's
//! `StateDirectory=`, then the XDG base directory for state.

use std::ffi::OsString;
use std::path::PathBuf;

/// The state file's name inside the state directory.
pub const STATE_FILE_NAME: &str = "leasehold.state";

/// The default state file: `$STATE_DIRECTORY/leasehold.state` under systemd (its first
/// directory, when it lists several), else `$XDG_STATE_HOME/leasehold/leasehold.state`, else
/// `$HOME/.local/state/leasehold/leasehold.state`. `None` when none of these variables is set
/// (to an absolute path): the caller must then be told to name a file.
///
/// The directory is not created here; the server creates it when it opens the file.
pub fn default_state_file() -> Option<PathBuf> {
    resolve(
        std::env::var_os("STATE_DIRECTORY"),
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// [`default_state_file`] over given variables, so that it can be tested without touching
/// the process environment.
fn resolve(
    state_directory: Option<OsString>,
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    // Relative values are ignored, as the XDG specification asks: they would depend on the
    // current directory again.
    let absolute =
        |value: Option<OsString>| value.map(PathBuf::from).filter(|path| path.is_absolute());
    // systemd joins several StateDirectory= entries with colons.
    let systemd = state_directory.and_then(|dirs| {
        let dirs = dirs.to_string_lossy().into_owned();
        absolute(dirs.split(':').next().map(OsString::from))
    });
    if let Some(dir) = systemd {
        return Some(dir.join(STATE_FILE_NAME));
    }
    let xdg = absolute(xdg_state_home)
        .or_else(|| absolute(home).map(|home| home.join(".local").join("state")))?;
    Some(xdg.join("leasehold").join(STATE_FILE_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn systemd_first_then_xdg_then_home() {
        assert_eq!(
            resolve(
                os("/var/lib/leasehold:/var/lib/other"),
                os("/x"),
                os("/home/u")
            ),
            Some(PathBuf::from("/var/lib/leasehold/leasehold.state"))
        );
        assert_eq!(
            resolve(None, os("/x/state"), os("/home/u")),
            Some(PathBuf::from("/x/state/leasehold/leasehold.state"))
        );
        assert_eq!(
            resolve(None, None, os("/home/u")),
            Some(PathBuf::from(
                "/home/u/.local/state/leasehold/leasehold.state"
            ))
        );
    }

    #[test]
    fn relative_or_missing_values_never_mean_the_current_directory() {
        assert_eq!(resolve(None, None, None), None);
        assert_eq!(resolve(os("state"), os("xdg"), os("home")), None);
        assert_eq!(
            resolve(os(""), os("rel"), os("/home/u")),
            Some(PathBuf::from(
                "/home/u/.local/state/leasehold/leasehold.state"
            ))
        );
    }
}
