import torch

from sd_lora import memory


def test_estimate_counts_weights_lora_state_and_cache():
    frozen = torch.nn.Linear(10, 10)  # 110 fp32 values
    lora = [torch.nn.Parameter(torch.zeros(4, 10)), torch.nn.Parameter(torch.zeros(10, 4))]  # 80 values
    parts = memory.estimate([frozen], lora, cache_bytes=1000)
    assert parts["frozen weights"] == 110 * 4
    assert parts["LoRA weights, gradients and optimizer state"] == 80 * 16
    assert parts["latent cache"] == 1000
    assert "GiB" in memory.describe_estimate(parts)


def test_peak_rss_is_plausible():
    block = bytearray(64 * 2**20)  # touch 64 MiB so the peak is at least that
    assert memory.peak_rss_bytes() >= len(block)
    assert memory.describe_peak(torch.device("cpu")).startswith("peak memory:")


def test_releasing_the_vae_encoder_keeps_decoding_exact():
    import torch

    from sd_lora.memory import module_bytes, release_vae_encoder
    from sd_lora.models.tiny import tiny_vae

    vae = tiny_vae()
    encoder_bytes = module_bytes(vae.encoder) + module_bytes(vae.quant_conv)
    latents = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = vae.decode(latents).sample
    assert release_vae_encoder(vae) == encoder_bytes > 0
    assert vae.encoder is None and not any(k.startswith(("encoder.", "quant_conv.")) for k in vae.state_dict())
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, before)
