"""Built-in OCR data: Chinese text lines rendered with a real CJK font, written in format (a).

Each line mixes a few "pieces": Chinese words from a small hand-written vocabulary, integers,
prices (¥476.0), percentages (12.5%), dates (3月15日) and Latin words. Every image varies
in font size, letter spacing, text and background colour (flat or a horizontal gradient),
Gaussian pixel noise and Gaussian blur. All randomness comes from one `random.Random(seed)`
and one `numpy.random.Generator(seed)`, and PIL's drawing and PNG encoding are
deterministic, so the same (n, seed) gives byte-identical files.

Output (paths in the JSONL are relative to it, so the folder can be moved):

    out_dir/<split>.jsonl          {"query": "<image>请识别图片中的文字", "response": text,
                                    "image_path": "images/<split>_00000.png"}
    out_dir/images/<split>_*.png   one text line each, 32..48 px high, at most 400 px wide
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data.fonts import load_cjk_font

OCR_QUERY = "请识别图片中的文字"
GENERATOR_VERSION = 1  # bump when the output for a seed changes: built-in data caches key on it
MAX_WIDTH = 400  # px; Qwen2.5-VL spends one token per 28x28 px, so small images are cheap
MIN_HEIGHT, MAX_HEIGHT = 32, 48

# Everyday words written for this project: shop signs, receipts, notices, directions.
_CHINESE_TEXT = """
    今天 明天 上午 下午 晚上 时间 日期 星期一 周末 营业时间 欢迎光临 谢谢惠顾
    请排队 小心地滑 禁止吸烟 安全出口 请勿停车 会议室 办公室 电梯 楼梯 停车场 洗手间 服务台
    收银台 入口 出口 北京 上海 广州 深圳 杭州 成都 南京 武汉 西安
    长沙 火车站 飞机场 地铁 公交车 出租车 高速公路 东门 南路 人民路 中山大道 第一中学
    图书馆 博物馆 医院 药店 银行 超市 菜市场 苹果 香蕉 西瓜 牛奶 面包
    鸡蛋 大米 白菜 豆腐 米饭 面条 饺子 包子 绿茶 咖啡 果汁 矿泉水
    小笼包 红烧肉 番茄炒蛋 单价 数量 金额 合计 总计 小计 找零 现金 优惠
    折扣 会员价 原价 特价 新品 促销 发票 收据 订单号 电话 地址 邮编
    姓名 性别 年龄 学校 班级 成绩 老师 学生 同学 朋友 公司 有限公司
    部门 经理 员工 工资 合同 报告 计划 项目 市场 销售 客户 服务
    质量 价格 产品 技术 管理 发展 天气 晴天 多云 小雨 大雪 温度
    春天 夏天 秋天 冬天 快乐 健康 平安 幸福 美丽 安静 干净 方便
    重要 注意 开始 结束 打开 关闭 上传 下载 登录 注册 确认 取消
    手机 电脑 网络 软件 系统 数据 文件 照片 视频 声音 中国 人民
    文化 历史 经济 社会 科学 自然 世界 未来 年度 季度 增长 下降
    提高 减少 总数 平均 比例 第三名
"""
_LATIN_TEXT = """
    OCR Hello World China Shop Open Sale Price Total Menu Coffee Tea Taxi Metro Exit
    WiFi Email Office Hotel Bank iPhone USB AI PDF VIP No. km kg cm GB
"""
CHINESE_WORDS: tuple[str, ...] = tuple(_CHINESE_TEXT.split())
LATIN_WORDS: tuple[str, ...] = tuple(_LATIN_TEXT.split())


def _price(rng: random.Random) -> str:
    return f"¥{rng.randint(1, 999)}.{rng.randint(0, 9)}" + ("0" if rng.random() < 0.4 else "")


def _percent(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return f"{rng.randint(0, 99)}.{rng.randint(0, 9)}%"
    return f"{rng.randint(1, 100)}%"


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 12)}月{rng.randint(1, 28)}日"


def _integer(rng: random.Random) -> str:
    return str(rng.choice((rng.randint(0, 99), rng.randint(100, 9999), rng.randint(1990, 2030))))


def _chinese(rng: random.Random) -> str:
    return "".join(rng.choice(CHINESE_WORDS) for _ in range(rng.randint(1, 3)))


def _latin(rng: random.Random) -> str:
    return rng.choice(LATIN_WORDS)


# Chinese dominates, as in real Chinese text lines; weights are relative.
_PIECES = ((_chinese, 6), (_price, 1), (_percent, 1), (_date, 1), (_integer, 1), (_latin, 1))


def random_piece(rng: random.Random) -> str:
    """One piece of a text line, drawn from the weighted piece kinds above."""
    makers, weights = zip(*_PIECES, strict=True)
    return rng.choices(makers, weights=weights)[0](rng)


@dataclass(frozen=True)
class LineStyle:
    """How one line is drawn; all colours are RGB in 0..255."""

    font_size: int
    spacing: int  # extra px between characters
    text_rgb: tuple[int, int, int]
    left_rgb: tuple[int, int, int]  # background at x = 0
    right_rgb: tuple[int, int, int]  # background at the right edge (== left_rgb: flat)
    noise_std: float  # Gaussian pixel noise, in grey levels
    blur_radius: float  # Gaussian blur radius in px (0: sharp)


def _rgb(rng: random.Random, low: int, high: int) -> tuple[int, int, int]:
    return (rng.randint(low, high), rng.randint(low, high), rng.randint(low, high))


def random_style(rng: random.Random) -> LineStyle:
    """A light background with dark text (or the reverse, 15% of the time)."""
    light = _rgb(rng, 190, 255)
    light2 = light if rng.random() < 0.5 else _rgb(rng, 190, 255)  # half flat, half gradient
    dark = _rgb(rng, 0, 70)
    if rng.random() < 0.15:
        text, left, right = light, dark, dark
    else:
        text, left, right = dark, light, light2
    return LineStyle(
        font_size=rng.randint(20, 30),
        spacing=rng.choice((0, 0, 1, 2, 3)),
        text_rgb=text,
        left_rgb=left,
        right_rgb=right,
        noise_std=rng.choice((0.0, 4.0, 8.0, 12.0)),
        blur_radius=rng.choice((0.0, 0.0, 0.4, 0.7, 1.0)),
    )


def _advance(text: str, style: LineStyle) -> float:
    """Width in px of `text` drawn character by character with the style's letter spacing."""
    font = load_cjk_font(style.font_size)
    return sum(font.getlength(c) + style.spacing for c in text) - style.spacing


def random_line(rng: random.Random, style: LineStyle, max_text_width: float) -> str:
    """Append pieces (one space between two Latin/number pieces) until the next would not fit."""
    text = ""
    for _ in range(rng.randint(1, 4)):
        piece = random_piece(rng)
        joiner = " " if text and text[-1].isascii() and piece[0].isascii() else ""
        candidate = text + joiner + piece
        if _advance(candidate, style) > max_text_width:
            break
        text = candidate
    if not text:  # even the first piece was too long: fall back to a short Chinese word
        text = rng.choice(CHINESE_WORDS)
    return text


def _background(width: int, height: int, style: LineStyle) -> np.ndarray:
    """[H, W, 3] float32 linear gradient from left_rgb to right_rgb."""
    t = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]  # [1, W, 1]
    left = np.array(style.left_rgb, dtype=np.float32)
    right = np.array(style.right_rgb, dtype=np.float32)
    row = left * (1.0 - t) + right * t  # [1, W, 3]
    return np.repeat(row, height, axis=0)  # [H, W, 3]


def render_line(
    text: str, style: LineStyle, rng: random.Random, noise: np.random.Generator
) -> Image.Image:
    """Draw `text` on a gradient, then add Gaussian noise and blur. Height 32..48 px."""
    font = load_cjk_font(style.font_size)
    ascent, descent = font.getmetrics()
    height = min(MAX_HEIGHT, max(MIN_HEIGHT, ascent + descent + rng.randint(2, 10)))
    margin_x = rng.randint(3, 10)
    width = min(MAX_WIDTH, int(np.ceil(_advance(text, style))) + 2 * margin_x)
    image = Image.fromarray(_background(width, height, style).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    x = float(margin_x)
    y = (height - ascent - descent) // 2 + rng.randint(-1, 1)
    for char in text:
        draw.text((x, y), char, font=font, fill=style.text_rgb)
        x += font.getlength(char) + style.spacing
    if style.noise_std > 0:
        pixels = np.asarray(image, dtype=np.float32)  # [H, W, 3]
        pixels += noise.normal(0.0, style.noise_std, size=pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if style.blur_radius > 0:
        image = image.filter(ImageFilter.GaussianBlur(style.blur_radius))
    return image


def generate_ocr_dataset(out_dir: Path, n: int, seed: int, split_name: str = "train") -> Path:
    """Render `n` text-line images into `out_dir`; return the path of the format-(a) JSONL."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    records = []
    for i in range(n):
        style = random_style(rng)
        text = random_line(rng, style, max_text_width=MAX_WIDTH - 20)
        image = render_line(text, style, rng, noise)
        relative = f"images/{split_name}_{i:05d}.png"
        image.save(out_dir / relative, format="PNG")
        records.append({"query": f"<image>{OCR_QUERY}", "response": text, "image_path": relative})
    jsonl = out_dir / f"{split_name}.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return jsonl
