//! `powercut`: mount a power-cut filesystem by hand and cut its power from
//! the keyboard.
//!
//! ```text
//! powercut MOUNTPOINT [--mode strict|journal] [--torn SEED | --torn-by-offset SEED]
//! ```
//! Then type on standard input:
//! - `cut`: cut the power, print what survived, and mount that again;
//! - `dump DIR`: cut, copy what survived into DIR (a real directory), remount;
//! - `show`: print what a cut now would keep, without cutting;
//! - `stats`: the requests the kernel sent so far;
//! - `quit` (or end of input): unmount.
#![forbid(unsafe_code)]

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use powercut::{Mode, PowerCutFs, Torn};

const USAGE: &str =
    "usage: powercut MOUNTPOINT [--mode strict|journal] [--torn SEED | --torn-by-offset SEED]";

struct Args {
    mountpoint: PathBuf,
    mode: Mode,
    torn: Option<Torn>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args_os().skip(1);
    let mut mountpoint = None;
    let mut mode = Mode::Strict;
    let mut torn = None;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--mode") => {
                let value = args.next().ok_or("--mode needs a value")?;
                mode = value
                    .to_string_lossy()
                    .parse()
                    .map_err(|e: powercut::Error| e.to_string())?;
            }
            Some(flag @ ("--torn" | "--torn-by-offset")) => {
                let value = args.next().ok_or(format!("{flag} needs a seed"))?;
                let seed = value
                    .to_string_lossy()
                    .parse()
                    .map_err(|e| format!("{flag}: {e}"))?;
                torn = Some(match flag {
                    "--torn" => Torn::InOrder(seed),
                    _ => Torn::ByOffset(seed),
                });
            }
            Some("-h" | "--help") => return Err(USAGE.into()),
            _ if mountpoint.is_none() => mountpoint = Some(PathBuf::from(arg)),
            _ => return Err(format!("unexpected argument {arg:?}\n{USAGE}")),
        }
    }
    Ok(Args {
        mountpoint: mountpoint.ok_or(USAGE)?,
        mode,
        torn,
    })
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut mount = PowerCutFs::new(args.mode, args.torn).mount(&args.mountpoint)?;
    eprintln!(
        "mounted on {} ({} mode, torn writes {}); commands: cut, dump DIR, show, stats, quit",
        args.mountpoint.display(),
        args.mode,
        args.torn
            .map_or("off".to_owned(), |torn| format!("{torn:?}"))
    );
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("cut"), None) | (Some("dump"), Some(_)) => {
                let image = mount.power_cut()?;
                print!("{image}");
                if let Some(dir) = line.split_whitespace().nth(1) {
                    image.write_to(dir)?;
                    eprintln!("written to {dir}");
                }
                mount = image.mount(args.mode, args.torn, &args.mountpoint)?;
                eprintln!("remounted what survived");
            }
            (Some("show"), None) => print!("{}", mount.snapshot()?),
            (Some("stats"), None) => println!("{:?}", mount.stats()?),
            (Some("quit"), None) => break,
            (None, _) => {}
            _ => eprintln!("commands: cut, dump DIR, show, stats, quit"),
        }
    }
    mount.unmount()?;
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("powercut: {e}");
            ExitCode::FAILURE
        }
    }
}
