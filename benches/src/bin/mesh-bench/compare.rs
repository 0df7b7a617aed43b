//! `mesh-bench compare OLD.json NEW.json`: every figure both runs have,
//! with the ratio new / old.

use std::path::Path;

use anyhow::Result;

use crate::results::Results;

pub fn print(old: &Path, new: &Path) -> Result<()> {
    let (old, new) = (Results::read(old)?, Results::read(new)?);
    println!(
        "old: {} at {} ({}); new: {} at {} ({})",
        old.machine.date,
        old.machine.git_commit,
        old.machine.kernel,
        new.machine.date,
        new.machine.git_commit,
        new.machine.kernel
    );
    println!(
        "{:<52} {:>12} {:>12} {:>9}  unit",
        "figure", "old", "new", "new/old"
    );
    for (key, figure) in &new.figures {
        let Some(before) = old.value(key) else {
            continue;
        };
        let ratio = if before == 0.0 {
            f64::NAN
        } else {
            figure.value / before
        };
        println!(
            "{key:<52} {before:>12.2} {:>12.2} {ratio:>9.2}  {}",
            figure.value, figure.unit
        );
    }
    let only_old: Vec<&String> = old
        .figures
        .keys()
        .filter(|k| !new.figures.contains_key(*k))
        .collect();
    if !only_old.is_empty() {
        println!("only in the old run: {only_old:?}");
    }
    Ok(())
}
