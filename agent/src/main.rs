use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let ebpf = weir_agent::datapath::loader::load(None).context("loading the datapath")?;
    for (name, _) in ebpf.programs() {
        println!("loaded {name}");
    }
    Ok(())
}
