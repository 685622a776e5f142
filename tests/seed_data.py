"""The seed tutorial's data, shared by the tests."""

from rolechat import Message

# The seed tutorial's In[17] messages and the text it prints.
SYSTEM = "你是专业的AI助手，请尽量回答简洁"
USER1 = "我想学做一道最简单的家常菜"
ASSISTANT1 = ("你可以尝试做西红柿炒鸡蛋，做法简单：1. 鸡蛋打散；2. 西红柿切块；"
              "3. 热油锅炒鸡蛋至熟；4. 锅中再放油，炒西红柿至出汁；"
              "5. 把鸡蛋倒进西红柿中，快速翻炒均匀即可。")
USER2 = "能再具体点吗？比如火候。"
IN17 = [Message("system", SYSTEM), Message("user", USER1), Message("assistant", ASSISTANT1),
        Message("user", USER2)]
IN17_TEXT = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER1}<|im_end|>\n"
             f"<|im_start|>assistant\n{ASSISTANT1}<|im_end|>\n<|im_start|>user\n{USER2}"
             "<|im_end|>\n<|im_start|>assistant\n")
