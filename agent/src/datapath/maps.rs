//! Typed handles on the pinned maps the agent writes.

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray},
};
use weir_common::{
    AddrKey, Config, EndpointInfo, EndpointKey, IdentityValue, MAP_CIDR_IDENTITIES, MAP_CONFIG,
    MAP_COUNTERS, MAP_ENDPOINTS, MAP_IPCACHE, MAP_POLICY, MAP_SUBJECTS, PolicyKey, PolicyValue,
    SubjectKey, SubjectPolicy,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("the kernel object has no map {0}")]
    Missing(&'static str),
    #[error("map {name} does not have the expected type or layout: {source}")]
    Layout {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// The maps that carry enforcement state, owned by the datapath writer.
pub struct DatapathMaps {
    pub config: Array<MapData, Config>,
    pub endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    pub ipcache: LpmTrie<MapData, AddrKey, IdentityValue>,
    pub cidr_identities: LpmTrie<MapData, AddrKey, IdentityValue>,
    pub subjects: HashMap<MapData, SubjectKey, SubjectPolicy>,
    pub policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    pub counters: PerCpuArray<MapData, u64>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Layout { name, source })
}

impl DatapathMaps {
    /// Takes the maps out of a loaded object (the programs keep their own references).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            config: take(ebpf, MAP_CONFIG)?,
            endpoints: take(ebpf, MAP_ENDPOINTS)?,
            ipcache: take(ebpf, MAP_IPCACHE)?,
            cidr_identities: take(ebpf, MAP_CIDR_IDENTITIES)?,
            subjects: take(ebpf, MAP_SUBJECTS)?,
            policy: take(ebpf, MAP_POLICY)?,
            counters: take(ebpf, MAP_COUNTERS)?,
        })
    }
}
