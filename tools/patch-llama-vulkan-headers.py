# Debian 12's Vulkan headers (1.3.239) predate VK_EXT_layer_settings, which llama.cpp's Vulkan
# backend uses only to switch on the validation layer's best-practice checks: drop that.
import re, sys
p = sys.argv[1]
s = open(p).read()
start = s.find("    std::vector<vk::LayerSettingEXT> settings = {")
if start < 0:
    sys.exit(0)  # already patched, or a llama.cpp without it
end = s.index("vk::InstanceCreateInfo instance_create_info(", start)
line_end = s.index("\n", end)
s = s[:start] + "    (void) layer_settings;\n    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions);" + s[line_end:]
s = s.replace('extensions.push_back("VK_EXT_layer_settings");', '(void) 0; // VK_EXT_layer_settings: not in these headers')
open(p, "w").write(s)
