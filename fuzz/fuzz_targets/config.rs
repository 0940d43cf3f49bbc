//! Config parsing and validation (`Config::parse`) on any text. Input up to
//! the first NUL byte is the file; the lines after it are the values of the
//! env overrides, in `ENV_OVERRIDES` order.
//!
//! Checked: no panic; a refused config names at least one problem; an
//! accepted one has at least one tenant and parses to the same config again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::ENV_OVERRIDES;
use sluice::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (file, env) = text.split_once('\0').unwrap_or((text, ""));
    let values: Vec<&str> = env.lines().collect();
    let env = |name: &str| {
        let at = ENV_OVERRIDES.iter().position(|(n, _)| *n == name)?;
        values.get(at).map(|v| v.to_string())
    };
    match Config::parse(file, env) {
        Ok(config) => {
            assert!(!config.tenants.is_empty(), "a config without tenants");
            let again = Config::parse(file, env).expect("the same text parses again");
            assert_eq!(config, again);
        }
        Err(e) => assert!(!e.0.is_empty(), "a refusal that names no problem"),
    }
});
