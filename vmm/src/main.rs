//! `vmm` command line: the flags are in `vmm::cli::vmm`.

use std::sync::Arc;

use clap::Parser;
use log::info;
use proto::peercred::{self, AllowList};
use vmm::cli::vmm::Args;
use vmm::devices::SerialOut;
use vmm::machine::{Machine, Status};
use vmm::memory::{GuestRam, RamBacking};
use vmm::vm::Vm;
use vmm::{control, guests, loader, migration};

fn serial_out(spec: &str) -> std::io::Result<SerialOut> {
    Ok(match spec {
        "stdout" => Box::new(std::io::stdout()),
        "none" => Box::new(std::io::sink()),
        path => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
    })
}

fn run(args: Args) -> Result<(), String> {
    if args.list_guests {
        for (name, _) in guests::BUILTIN {
            println!("{name}");
        }
        return Ok(());
    }
    if let (Some(path), Some(g)) = (&args.export_guest, &args.guest) {
        let image = guests::builtin(g)
            .ok_or_else(|| format!("no built-in guest \"{g}\" (try --list-guests)"))?;
        return std::fs::write(path, image).map_err(|e| format!("writing {}: {e}", path.display()));
    }
    if args.vcpus == 0 || args.vcpus > 64 {
        return Err(format!("--vcpus {} must be in 1..=64", args.vcpus));
    }
    let image: Option<Vec<u8>> = match (&args.guest, &args.kernel) {
        (Some(g), _) => Some(
            guests::builtin(g)
                .ok_or_else(|| format!("no built-in guest \"{g}\" (try --list-guests)"))?
                .to_vec(),
        ),
        (None, Some(k)) => {
            Some(std::fs::read(k).map_err(|e| format!("reading kernel {}: {e}", k.display()))?)
        }
        (None, None) => None,
    };
    if image.is_none() && args.incoming.is_none() {
        return Err("give --guest, --kernel or --incoming".into());
    }
    // Before anything is built: a mistyped group is an error at once.
    let control_group = args
        .control_group
        .as_deref()
        .map(peercred::resolve_group)
        .transpose()
        .map_err(|e| format!("--control-group: {e}"))?;
    let allow_gids = args
        .allow_gid
        .iter()
        .map(|g| peercred::resolve_group(g))
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|e| format!("--allow-gid: {e}"))?;
    let allow = AllowList::for_this_process(args.allow_uid.clone(), allow_gids);
    let backing = if args.hugepages {
        RamBacking::HugePages2M
    } else {
        RamBacking::Pages4K
    };
    let ram = GuestRam::with_backing(args.mem, backing).map_err(|e| e.to_string())?;
    if args.incoming.is_none() {
        if let Some(seed) = args.prefill {
            ram.prefill(seed, args.prefill_size.unwrap_or(u64::MAX));
        }
    }
    let ram = Arc::new(ram);
    let out =
        serial_out(&args.serial).map_err(|e| format!("serial output {}: {e}", args.serial))?;
    let vm = Vm::new(ram.clone(), args.vcpus, out).map_err(|e| e.to_string())?;
    let control_path = args.control.clone().ok_or("--control is required")?;
    let listener = control::bind(&control_path, control_group)
        .map_err(|e| format!("control socket {}: {e}", control_path.display()))?;

    let status = if args.incoming.is_some() {
        Status::Inmigrate
    } else if args.paused {
        Status::Paused
    } else {
        Status::Running
    };
    if args.incoming.is_none() {
        if let Some(img) = &image {
            let boot = loader::load(&ram, img, &args.cmdline).map_err(|e| e.to_string())?;
            vm.setup_multiboot_entry(boot).map_err(|e| e.to_string())?;
        }
    }
    let machine = Machine::new(vm, args.name.clone(), args.umemd.clone(), status);
    if args.incoming.as_deref() == Some("defer") {
        machine.state().deferred_incoming = Some(!args.paused);
    } else if let Some(uri) = args.incoming.clone() {
        let tls_creds = args
            .incoming_tls_creds
            .as_ref()
            .map(|d| d.display().to_string());
        let auth = control::build_peer_auth(
            None,
            args.incoming_secret_file.as_deref(),
            tls_creds.as_deref(),
            args.incoming_insecure,
        )
        .map_err(|e| format!("incoming migration: {e}"))?;
        migration::start_incoming(&machine, uri, auth, !args.paused).map_err(|e| e.to_string())?;
    } else if status == Status::Running {
        machine.vm.resume();
    }
    info!(
        "{}: {} MiB in {} KiB pages, {} vCPUs, control socket {}",
        args.name,
        args.mem >> 20,
        ram.page_size() >> 10,
        args.vcpus,
        control_path.display()
    );
    control::serve(listener, machine, allow);
    Ok(())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(Args::parse()) {
        // Once, whatever RUST_LOG says: the reason the VMM did not start.
        eprintln!("vmm: {e}");
        std::process::exit(1);
    }
}
