"""Gradio app (placeholder until the full UI lands): starts and says which weights it runs on."""

from __future__ import annotations

import gradio as gr


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="CLIP anomaly inspection") as demo:
        gr.Markdown("# CLIP anomaly inspection\nThe full interface is under construction.")
    return demo


if __name__ == "__main__":
    build_demo().launch()
