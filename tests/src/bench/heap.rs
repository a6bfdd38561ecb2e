//! Where the agent's heap goes at rest: the structures the agent keeps after it has read a
//! cluster, built in this process from the same objects with the agent's own code, each
//! measured by the live bytes it adds. The bench binary counts live bytes with
//! [`CountingAllocator`] (bytes requested, without the allocator's own overhead).

use std::{
    alloc::{GlobalAlloc, Layout},
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    sync::atomic::{AtomicIsize, Ordering},
};

use weir_agent::{
    datapath::{desired::desired_maps, loader, maps::DatapathMaps, writer::Writer},
    flows::Explainer,
    source::manifests::ManifestDir,
};
use weir_policy::{
    compile::CompileInput, identity::IdentityAllocator, incremental::Incremental, model::ObjectKey,
};

static LIVE: AtomicIsize = AtomicIsize::new(0);

/// A global allocator that counts the bytes live in `A`.
pub struct CountingAllocator<A>(pub A);

// SAFETY: every call is forwarded to `A` unchanged; only the counter is added.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAllocator<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { self.0.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

/// Bytes live now (0 when the binary's allocator is not a [`CountingAllocator`]).
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn mib(bytes: isize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Builds, as the agent does at rest, the manifests source over `dir`, the reconcile task's
/// merged state, the compile output with its incremental index, the writer's bookkeeping and
/// the explainer, and prints the live bytes each holds.
pub fn attribute(
    dir: &Path,
    node_name: &str,
    local: &BTreeMap<ObjectKey, Vec<IpAddr>>,
) -> anyhow::Result<()> {
    if live_bytes() == 0 {
        println!("  heap attribution skipped: the binary does not count its allocations");
        return Ok(());
    }
    let mut rows: Vec<(&str, isize)> = Vec::new();
    let start = live_bytes();

    let mut source = ManifestDir::new(dir);
    let first_state = source.scan()?;
    let with_first = live_bytes();
    let merged = first_state.clone();
    let one_state = live_bytes() - with_first;
    drop(first_state);
    rows.push((
        "manifests source (its files' objects, its state, indexes)",
        live_bytes() - start - one_state,
    ));
    rows.push((
        "reconcile task's merged state (one ClusterState)",
        one_state,
    ));

    let input = CompileInput {
        state: merged,
        node_name: node_name.to_owned(),
        cluster_id: 0,
        local_endpoints: local.clone(),
    };
    let mut ids = IdentityAllocator::default();
    let before = live_bytes();
    let (compiled, incremental) = Incremental::compile(&input, &mut ids)?;
    let with_both = live_bytes();
    drop(incremental);
    rows.push(("incremental index", with_both - live_bytes()));
    rows.push(("compile output (Compiled)", live_bytes() - before));
    let (compiled, incremental) = {
        drop(compiled);
        let mut ids = IdentityAllocator::default();
        let out = Incremental::compile(&input, &mut ids)?;
        rows.push(("identity allocator", identity_bytes(&input)?));
        out
    };

    let mut ebpf = loader::load(None)?;
    let before = live_bytes();
    let mut writer = Writer::adopt(DatapathMaps::take(&mut ebpf)?)?;
    let desired = desired_maps(&compiled, |_| Some(1), 0);
    let with_desired = live_bytes();
    let stats = writer.apply(&desired)?;
    let written = live_bytes() - with_desired;
    drop(desired);
    rows.push((
        "desired maps (a temporary of every full write)",
        with_desired - before - (live_bytes() - before - written),
    ));
    rows.push(("map writer's applied entries", written));

    let before = live_bytes();
    let explainer = Explainer::default().rebuilt(&compiled);
    rows.push(("explainer", live_bytes() - before));

    let total = live_bytes() - start;
    println!(
        "  heap at rest in this process, the agent's structures over the same directory ({} map entries written):",
        stats.writes
    );
    for (what, bytes) in &rows {
        println!("    {what:<58} {:>8.1} MiB", mib(*bytes));
    }
    println!(
        "    {:<58} {:>8.1} MiB (without the desired maps)",
        "total",
        mib(total)
    );
    drop((explainer, writer, incremental, compiled, input, source));
    Ok(())
}

/// The identity allocator after a full compile of `input`.
fn identity_bytes(input: &CompileInput) -> anyhow::Result<isize> {
    let mut ids = IdentityAllocator::default();
    let (compiled, incremental) = Incremental::compile(input, &mut ids)?;
    drop((compiled, incremental));
    let with = live_bytes();
    drop(ids);
    Ok(with - live_bytes())
}
