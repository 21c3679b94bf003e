//! The command as a child process: its own process group, the terminal handed to it, and
//! signals to the whole group.
//!
//! Why a process group: `sh -c 'a; b'` or a script runs its work in grandchildren. Stopping
//! the command after a lost lease must stop all of them, and a forwarded signal must reach
//! them once (not twice, as it would if the command shared the terminal's process group with
//! us). When stdin is the terminal and we are in its foreground, the new group becomes the
//! terminal's foreground (as a shell does, and as tini does), so the command can still read
//! from the terminal and gets Ctrl-C straight from it.

use std::ffi::OsString;
use std::io;
use tokio::process::{Child, Command};

/// A running command.
#[derive(Debug)]
pub struct Running {
    pub child: Child,
    /// Its pid, which is also its process group id.
    pub pid: libc::pid_t,
    /// Whether the terminal's foreground was handed to the command (and must be taken back).
    terminal: bool,
}

/// Starts `command` (program and arguments) with `env` added to our environment.
///
/// On Linux the command's main process is also sent SIGKILL if leasehold dies (for
/// example of SIGKILL), so that it does not run on without the lock. Processes it started
/// itself are not covered by that.
pub fn spawn(command: &[OsString], env: &[(&str, String)]) -> io::Result<Running> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command given"))?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let terminal = in_terminal_foreground();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls; it neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if terminal {
                // A background group may take the terminal only with SIGTTOU blocked.
                block_ttou(true);
                libc::tcsetpgrp(libc::STDIN_FILENO, libc::getpid());
                block_ttou(false);
            }
            #[cfg(target_os = "linux")]
            {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent died before prctl took effect: do not run unsupervised.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = parent;
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    if terminal {
        // We are in the background now: without this, a message on the terminal would stop
        // us (SIGTTOU) where `stty tostop` is set.
        // SAFETY: only changes this thread's signal mask.
        unsafe { block_ttou(true) };
    }
    let pid = child.id().map_or(0, |id| id as libc::pid_t);
    Ok(Running {
        child,
        pid,
        terminal,
    })
}

impl Running {
    /// Sends `signal` to the command's whole process group, then SIGCONT so that a stopped
    /// command acts on it (as GNU timeout does).
    ///
    /// The group id cannot name anyone else while the child is unreaped. After that it still
    /// reaches what is left of the group (a group id is not reused while any member lives);
    /// when nothing is left it finds no one.
    pub fn signal_group(&self, signal: libc::c_int) {
        if self.pid > 0 {
            // SAFETY: kill has no memory-safety preconditions. ESRCH (the group is gone)
            // needs no handling.
            unsafe {
                libc::kill(-self.pid, signal);
                if signal != libc::SIGKILL && signal != libc::SIGCONT {
                    libc::kill(-self.pid, libc::SIGCONT);
                }
            }
        }
    }

    /// Takes the terminal back after the command ended, if it was handed over.
    pub fn reclaim_terminal(&mut self) {
        if std::mem::take(&mut self.terminal) {
            take_terminal();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.reclaim_terminal();
    }
}

/// True if stdin is a terminal whose foreground process group is ours.
fn in_terminal_foreground() -> bool {
    // SAFETY: plain system calls on a file descriptor number.
    unsafe {
        libc::isatty(libc::STDIN_FILENO) == 1
            && libc::tcgetpgrp(libc::STDIN_FILENO) == libc::getpgrp()
    }
}

/// Makes our process group the terminal's foreground again (from the background, so with
/// SIGTTOU still blocked), then unblocks SIGTTOU.
fn take_terminal() {
    // SAFETY: plain system calls; the mask change only affects this thread.
    unsafe {
        libc::tcsetpgrp(libc::STDIN_FILENO, libc::getpgrp());
        block_ttou(false);
    }
}

/// Blocks or unblocks SIGTTOU for the calling thread. Async-signal-safe.
///
/// # Safety
/// Changes the calling thread's signal mask; callers pair blocking with unblocking.
unsafe fn block_ttou(block: bool) {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut ttou: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut ttou);
        libc::sigaddset(&mut ttou, libc::SIGTTOU);
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &ttou, std::ptr::null_mut());
    }
}
