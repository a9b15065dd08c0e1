//! Lays out the release binary's code so that what a running seam executes sits
//! together (benches/symbol-order.txt, written by benches/symbol-order.sh).
//!
//! The kernel maps an executable's pages into a process 64 KiB around each page it
//! touches ("fault-around"), and counts them in its resident set. With the linker's own
//! order the code seam runs is spread over the whole 8.4 MiB of `.text`, so about 7.4
//! MiB of it was resident in every seam before the first request; listed first, the
//! code it runs fits in about 4 MiB (benches/RESULTS.md, "Peak RSS").
//!
//! Only rust-lld (Rust's default linker for x86_64-unknown-linux-gnu) is known to take
//! the list, so it is passed only for that target, in release builds, when no other
//! linker is configured. `SEAM_SYMBOL_ORDER=off` turns it off. Names missing from the
//! binary (the list was made from an older build) are skipped, costing only the layout.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=benches/symbol-order.txt");
    println!("cargo:rerun-if-env-changed=SEAM_SYMBOL_ORDER");

    let var = |name: &str| env::var(name).unwrap_or_default();
    let default_linker = var("RUSTC_LINKER").is_empty()
        && !var("CARGO_ENCODED_RUSTFLAGS").contains("link-self-contained=-linker");
    if var("SEAM_SYMBOL_ORDER") == "off"
        || var("TARGET") != "x86_64-unknown-linux-gnu"
        || var("PROFILE") != "release"
        || !default_linker
    {
        return;
    }
    let list = Path::new(&var("CARGO_MANIFEST_DIR")).join("benches/symbol-order.txt");
    if list.is_file() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
