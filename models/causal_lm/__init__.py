"""Text-only decoder LMs (Llama, Qwen2, Mistral, GPT-NeoX, ... any `AutoModelForCausalLM` whose
cache is a transformers `DynamicCache`): one `decoder` component, host-side token embedding."""
