//! Lua scripts: each is a `.lua` file of the module that uses it, with a
//! header naming its KEYS and ARGV and asserting their count, compiled in
//! with `include_str!` and run as a plain command.

use std::sync::Arc;

use redis::Cmd;

/// A Lua script, run by its SHA1 (`EVALSHA`) and loaded again when the
/// server has forgotten it (a restart, `SCRIPT FLUSH`): what
/// `redis::Script` does, but a call is a plain `Cmd` whose arguments go
/// straight into its one buffer. A `redis::ScriptInvocation` keeps every
/// argument in a `Vec` of its own and copies them all into a `Cmd` again
/// at each call: on the miss path, an answer of kilobytes (`FINISH`'s
/// argument) was copied twice more than it needs to be.
#[derive(Clone)]
pub(crate) struct Lua {
    /// The script's name, for logs and errors.
    pub(crate) name: &'static str,
    pub(super) code: &'static str,
    pub(super) sha: Arc<str>,
}

impl Lua {
    pub(super) fn new(name: &'static str, code: &'static str) -> Lua {
        let sha = redis::Script::new(code).get_hash().into();
        Lua { name, code, sha }
    }

    /// A call on `keys`: `EVALSHA <sha> <n> <keys…>`, the script's
    /// arguments to follow (`Cmd::arg`); `room`, about how many bytes they
    /// take, so the buffer is allocated once.
    pub(crate) fn call(&self, keys: &[&str], room: usize) -> Cmd {
        let key_bytes: usize = keys.iter().map(|k| k.len()).sum();
        let mut cmd = Cmd::with_capacity(3 + keys.len() + 8, 64 + key_bytes + room);
        cmd.arg("EVALSHA").arg(&*self.sha).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        cmd
    }
}
