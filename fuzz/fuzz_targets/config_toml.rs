//! `quiver_config::Config::parse` on arbitrary text: never a panic, and its
//! two answers agree with each other: a configuration it accepts passes
//! `validate` (the check that flags on the command line go through), and one
//! it refuses is refused with at least one error, each with a path.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match quiver_config::Config::parse(text) {
        Ok(config) => {
            if let Err(e) = config.validate() {
                panic!("parsed, then failed validation: {e}");
            }
        }
        Err(e) => {
            assert!(!e.errors.is_empty(), "refused with no error");
        }
    }
});
