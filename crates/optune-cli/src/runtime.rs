//! The runtime flags' meanings, and what the tools report about the process.

use anyhow::Result;

/// The device named by `--device`: `cpu`, `cuda` or `cuda:N`. Without a name: the first GPU when
/// the binary was built with the `cuda` feature and one is visible, else the CPU.
pub fn device(spec: Option<&str>) -> Result<candle_core::Device> {
    use candle_core::Device;
    match spec {
        None if candle_core::utils::cuda_is_available() => {
            Ok(Device::new_cuda(0).unwrap_or(Device::Cpu))
        }
        None | Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => Device::new_cuda(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}")),
        Some(other) => {
            let ordinal = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("--device '{other}': expected cpu, cuda or cuda:N")
                })?;
            Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("--device {other}: {e}"))
        }
    }
}

/// The dtype named by `--dtype`; by default f32 on the CPU and bf16 on a GPU.
pub fn dtype(spec: Option<&str>, device: &candle_core::Device) -> Result<candle_core::DType> {
    use candle_core::DType;
    match spec {
        None if device.is_cuda() => Ok(DType::BF16),
        None | Some("f32") => Ok(DType::F32),
        Some("bf16") => Ok(DType::BF16),
        Some("f16") => Ok(DType::F16),
        Some(other) => anyhow::bail!("--dtype '{other}': expected f32, bf16 or f16"),
    }
}

/// Bytes the device can still give: the CPU's `MemAvailable` (Linux), a GPU's free memory as its
/// driver reports it; `None` when it cannot be read.
pub fn available_memory(device: &candle_core::Device) -> Option<f64> {
    if device.is_cpu() {
        return proc_kb("/proc/meminfo", "MemAvailable").map(|kb| kb * 1024.0);
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(gpu) = device {
        let (free, _total) = gpu.cuda_stream().context().mem_get_info().ok()?;
        return Some(free as f64);
    }
    None
}

/// The process's peak resident memory so far in MB (`VmHWM` of /proc/self/status, Linux); `None`
/// elsewhere. The tools print it in their summary line.
pub fn peak_rss_mb() -> Option<f64> {
    proc_kb("/proc/self/status", "VmHWM").map(|kb| kb / 1024.0)
}

/// The number of a `Field:   1234 kB` line of a /proc file (Linux); `None` elsewhere.
fn proc_kb(path: &str, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn the_cpu_has_some_memory_available() {
        let bytes = available_memory(&candle_core::Device::Cpu).expect("MemAvailable on Linux");
        // At least what this test holds, at most the machine's memory.
        let block = vec![1u8; 16 << 20];
        let total = proc_kb("/proc/meminfo", "MemTotal").expect("MemTotal on Linux") * 1024.0;
        assert!(
            bytes > block.len() as f64 && bytes <= total,
            "{bytes} of {total}"
        );
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn peak_rss_counts_touched_memory() {
        let block = vec![1u8; 64 << 20];
        let peak = peak_rss_mb().expect("VmHWM on Linux");
        assert!(peak >= 64.0, "peak {peak} MB after touching 64 MB");
        assert_eq!(block.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
    }
}
